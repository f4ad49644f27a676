"""oneDNN's convolutions as XLA:CPU custom calls (rethink_jax/ops/onednn.py) against the
reference form: values and both gradients, jitted, vmapped and inside a conditional; which convs
xla_cpu.conv2d sends there, and its XLA forms when they cannot be built (those forms against the
reference: tests/ops/test_xla_cpu.py)."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rethink_jax.ops import onednn
from rethink_jax.ops import xla_cpu


def _value_and_grads(conv, x, kernel, cot):
  y, vjp = jax.vjp(conv, x, kernel)
  return (y, *vjp(cot))


def _assert_close(got, want, tol=1e-5):
  for a, b in zip(got, want):
    assert a.shape == b.shape and a.dtype == b.dtype
    # Entries are sums of products as large as the biggest: error relative to the array's scale.
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.max(np.abs(b))))


def test_available_in_the_test_environment():
  """requirements.txt installs oneDNN and the image has a compiler: the fast form must be used."""
  assert onednn.available(), onednn._load()


@pytest.mark.parametrize(
  "shape,k,stride,padding,dilation,groups",
  [
    ((2, 9, 11, 16), 3, 1, 1, 1, 4),  # ResNeXt's 3x3, groups of 4 channels
    ((1, 12, 10, 64), 3, 2, 1, 1, 32),  # the strided first block of a stage
    ((2, 7, 8, 12), 3, 1, 1, 1, 12),  # depthwise
    ((1, 13, 9, 8), 3, 2, 2, 2, 2),  # dilated, strided, odd sizes
    ((2, 6, 5, 6), 1, 1, 0, 1, 3),  # grouped 1x1
    ((1, 8, 9, 8), 5, 1, 2, 1, 1),  # dense
    ((1, 9, 9, 4), 3, 3, 0, 1, 2),  # stride 3 without padding: rows left over at the end
  ],
)
def test_conv2d_equals_reference(rng, shape, k, stride, padding, dilation, groups):
  c = shape[-1]
  cout = 2 * c if k != 1 else 9
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, c // groups, cout)) / k, jnp.float32)
  spec = xla_cpu.ConvSpec((stride, stride), (padding, padding), (dilation, dilation), groups)
  ours = functools.partial(
    onednn.conv2d, strides=spec.strides, padding=spec.padding, dilation=spec.dilation, groups=groups
  )
  reference = functools.partial(xla_cpu.conv2d_reference, spec=spec)
  cot = jnp.asarray(rng.normal(size=jax.eval_shape(reference, x, kernel).shape), jnp.float32)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(functools.partial(_value_and_grads, reference))(x, kernel, cot)
  got = jax.jit(functools.partial(_value_and_grads, ours))(x, kernel, cot)
  _assert_close(got, want)


def test_conv2d_vmapped_and_inside_cond(rng):
  """Under vmap (a loop over the mapped axis) and in a conditional, as in the mask head."""
  x = jnp.asarray(rng.normal(size=(3, 2, 6, 7, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 8)), jnp.float32)
  spec = xla_cpu.ConvSpec((1, 1), (1, 1), (1, 1), 4)

  def loss(conv, taken, x, kernel):
    per_item = jax.vmap(lambda x, k: jnp.sum(jnp.square(conv(x, k))))  # no cancelling terms
    return jax.lax.cond(taken, lambda: jnp.sum(per_item(x, kernel)), lambda: 0.0)

  ours = lambda x, k: onednn.conv2d(x, k, (1, 1), (1, 1), (1, 1), 4)
  reference = lambda x, k: xla_cpu.conv2d_reference(x, k, spec)
  got = jax.jit(jax.value_and_grad(functools.partial(loss, ours), (1, 2)))(True, x, kernel)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(jax.value_and_grad(functools.partial(loss, reference), (1, 2)))(True, x, kernel)
  _assert_close(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))


@pytest.mark.parametrize("kernel_size,groups", [(3, 4), (3, 1)])
def test_public_conv2d_calls_onednn_for_float32_on_cpu_only(rng, kernel_size, groups):
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 16 // groups, 16)), jnp.float32)

  def lowered(x, kernel, platform=None):
    conv = functools.partial(xla_cpu.conv2d, strides=(1, 1), padding=(1, 1), groups=groups)
    f = jax.value_and_grad(lambda x, k: jnp.sum(conv(x, k)), (0, 1))
    traced = jax.jit(f).trace(x, kernel)
    return (traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()).as_text()

  on_cpu = lowered(x, kernel)
  for kind in ("forward", "input_gradient", "kernel_gradient"):
    assert f"rethink_conv_{kind}" in on_cpu
  assert "rethink_conv" not in lowered(x, kernel, platform="tpu")
  assert "rethink_conv" not in lowered(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))


def test_several_devices_use_the_xla_forms(rng, monkeypatch):
  """XLA's SPMD partitioner would gather a sharded batch onto every device for a custom call."""
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 16)), jnp.float32)
  conv = functools.partial(xla_cpu.conv2d, strides=(1, 1), padding=(1, 1), groups=4)
  assert "rethink_conv" not in jax.jit(conv).lower(x, kernel).as_text()


def test_1x1_convs_stay_matmuls(rng):
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(1, 1, 16, 8)), jnp.float32)
  conv = functools.partial(xla_cpu.conv2d, strides=(2, 2), padding=(0, 0))
  text = jax.jit(conv).lower(x, kernel).as_text()
  assert "rethink_conv" not in text and "dot_general" in text


def test_without_a_compiler_xla_form_is_used_and_the_reason_logged(tmp_path):
  script = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from rethink_jax.ops import onednn, xla_cpu
    assert not onednn.available()
    x = jnp.ones((1, 6, 6, 8)); k = jnp.ones((3, 3, 2, 8))
    y = jax.jit(lambda x, k: xla_cpu.conv2d(x, k, strides=(1, 1), padding=(1, 1), groups=4))(x, k)
    assert float(y[0, 2, 2, 0]) == 18.0, y[0, 2, 2, 0]
  """)
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), JAX_PLATFORMS="cpu")
  env["RETHINK_JAX_BUILD_DIR"] = str(tmp_path / "build")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "oneDNN convolutions unavailable, using XLA's" in result.stderr
  assert not list((tmp_path / "build").glob("*.so"))
