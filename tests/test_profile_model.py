"""scripts/profile_model.py: grouping a profiler trace of a jitted step by Flax module."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def profile_model():
  spec = importlib.util.spec_from_file_location(
    "profile_model", os.path.join(ROOT, "scripts", "profile_model.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), name="stem")(x))
    return nn.Dense(4, name="head")(x.mean((1, 2)))


def test_scope_of_names_module_and_direction(profile_model):
  assert profile_model.scope_of("jit(step)/jvp(MaskRCNN)/roi_heads/mask_head/conv", 2) == (
    "fwd MaskRCNN/roi_heads"
  )
  assert profile_model.scope_of(
    "jit(step)/transpose(jvp(MaskRCNN))/backbone/res2/conv_general_dilated", 3
  ) == ("bwd MaskRCNN/backbone/res2")
  assert profile_model.scope_of("jit(step)/add", 2) == "fwd add"
  assert profile_model.scope_of("jit(step)", 2) == "fwd (step)"


def test_trace_of_a_jitted_step_is_grouped_by_module(profile_model, tmp_path):
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
  net = _Net()
  params = net.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), x)

  def step(p, x):
    return jax.grad(lambda q: jnp.sum(net.apply(q, x) ** 2))(p)

  compiled = jax.jit(step).lower(params, x).compile()
  known = profile_model.op_names(compiled.as_text())
  scopes = {profile_model.scope_of(v, 1) for v in known.values()}
  assert {"fwd _Net", "bwd _Net"} <= scopes, scopes
  jax.block_until_ready(compiled(params, x))
  with jax.profiler.trace(str(tmp_path)):
    jax.block_until_ready(compiled(params, x))
  per_op = profile_model.seconds_per_op(str(tmp_path), known)
  assert per_op and all(name in known for name in per_op)
  assert all(s >= 0 for s in per_op.values()) and sum(per_op.values()) > 0
  with pytest.raises(FileNotFoundError, match="xplane"):
    profile_model.seconds_per_op(str(tmp_path / "empty"), known)
