"""rethink_jax.trainer: the shared skeleton on a tiny regression task (the step's update against a
hand-computed SGD step, the finite check, donation, predict), and scripts/benchmark_model.py
timing the trainer's own step (train.build_parts), not a step of its own."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rethink_jax import optim
from rethink_jax import train
from rethink_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 0.1


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1, name="dense")(x)[:, 0]


def _init_variables(model, rngs, batch):
  return model.init(rngs, batch["x"])


def _loss(model, params, collections, batch, rng):
  del rng
  pred = model.apply({"params": params, **collections}, batch["x"])
  mse = jnp.mean((pred - batch["y"]) ** 2)
  return mse, ({"mse": mse}, {})


def _predict(model, variables, batch):
  return {"y": model.apply(variables, batch["x"])}


def _batch(rng, n=4, d=3):
  return {
    "x": rng.normal(size=(n, d)).astype(np.float32),
    "y": rng.normal(size=(n,)).astype(np.float32),
  }


def test_step_updates_checks_finite_and_donates():
  rng = np.random.default_rng()
  sample = _batch(rng)
  parts = trainer.build(
    _Linear(),
    trainer.make_mesh(),
    sample,
    init_variables=_init_variables,
    loss_fn=_loss,
    make_optimizer=lambda shapes: (optax.sgd(LR), lambda step: jnp.float32(LR)),
    predict=_predict,
  )
  state = parts.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), sample)
  assert int(state["step"]) == 0 and int(state["bad_step"]) == -1
  assert set(state) == {"step", "rng", "params", "opt_state", "collections", "bad_step"}

  # One finite step == a hand-computed SGD step on the mean squared error.
  batch = _batch(rng)
  w = np.asarray(state["params"]["dense"]["kernel"], np.float64)
  b = np.asarray(state["params"]["dense"]["bias"], np.float64)
  err = batch["x"] @ w[:, 0] + b[0] - batch["y"]
  grad_w = 2 * batch["x"].T @ err / len(err)
  grad_b = 2 * err.mean()
  old_kernel = state["params"]["dense"]["kernel"]
  state, metrics = parts.train_step(state, trainer.to_global(batch, parts.batch_sharding))
  assert old_kernel.is_deleted()  # the step donated its state
  m = trainer.check_finite(metrics, lambda bad, m: "unexpected")
  np.testing.assert_allclose(m["mse"], np.mean(err**2), rtol=1e-5)
  np.testing.assert_allclose(m["total_loss"], m["mse"])
  np.testing.assert_allclose(m["grad_norm"], np.sqrt(np.sum(grad_w**2) + grad_b**2), rtol=1e-5)
  np.testing.assert_allclose(
    state["params"]["dense"]["kernel"][:, 0], w[:, 0] - LR * grad_w, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    state["params"]["dense"]["bias"][0], b[0] - LR * grad_b, rtol=1e-5, atol=1e-6
  )
  assert int(m["bad_step"]) == -1 and int(state["step"]) == 1

  # predict: this process's rows of the model's outputs.
  out = parts.predict_fn(trainer.variables_of(state), batch)
  expected = (
    batch["x"] @ np.asarray(state["params"]["dense"]["kernel"])[:, 0]
    + np.asarray(state["params"]["dense"]["bias"])[0]
  )
  np.testing.assert_allclose(out["y"], expected, rtol=1e-5, atol=1e-6)

  # A NaN input at step 1: nothing is applied, then or later (sticky), and the host's check
  # raises with the task's message.
  good = jax.device_get(state["params"])
  poisoned = dict(batch, x=batch["x"].copy())
  poisoned["x"][1, 2] = np.nan
  state, metrics = parts.train_step(state, trainer.to_global(poisoned, parts.batch_sharding))
  state, metrics = parts.train_step(state, trainer.to_global(_batch(rng), parts.batch_sharding))
  assert int(state["step"]) == 3 and int(state["bad_step"]) == 1
  for a, b in zip(jax.tree_util.tree_leaves(good), jax.tree_util.tree_leaves(state["params"])):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(trainer.NonFiniteLossError, match="bad step 1 of 3"):
    trainer.check_finite(metrics, lambda bad, m: f"bad step {bad} of {int(state['step'])}")
  assert issubclass(trainer.NonFiniteLossError, FloatingPointError)
  assert train.NonFiniteLossError is trainer.NonFiniteLossError


# ------------------------------------------------------------------------------------------------
# scripts/benchmark_model.py builds the trainer's parts.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def benchmark_model():
  spec = importlib.util.spec_from_file_location(
    "benchmark_model", os.path.join(ROOT, "scripts", "benchmark_model.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# A small model through --set (config_flags parses every value by the field's type).
_TINY = [
  "backbone.depth=18",
  "backbone.width=8",
  "backbone.num_groups=4",
  "fpn.out_channels=16",
  "num_classes=3",
  "mask_head.chunk_rois=0",
  "box_head.conv_dim=16",
  "box_head.fc_dim=32",
  "mask_head.conv_dim=16",
  "anchors.sizes=((8,), (16,), (32,), (64,), (128,))",
  "rpn.post_nms_topk_train=32",
  "roi_heads.batch_size_per_image=16",
]


def test_benchmark_uses_the_trainers_parts(benchmark_model):
  parts, host, data = benchmark_model.jax_parts(64, 2, _TINY)
  config = benchmark_model.jax_train_config(_TINY, 2)
  c = config.model
  assert (c.backbone.depth, c.mask_head.chunk_rois, c.anchors.sizes[0]) == (18, 0, (8,))
  # train.py's construction for the same config, batch and device is the very same object:
  # the benchmark times the trainer's jitted step (state, NaN bookkeeping, donation).
  sched = optim.resolve_schedule(config.schedule, config.optim, 2)
  mesh = trainer.make_mesh(jax.devices()[:1])
  assert train.build_parts(config, sched, mesh, train.init_batch(host)) is parts
  assert sched["base_lr"] == pytest.approx(0.02)  # torchvision's side's SGD LR
  assert data["image"].sharding == parts.batch_sharding
  with pytest.raises(AttributeError, match="nope"):
    benchmark_model.model_config_with(["mask_head.nope=1"])


@pytest.mark.slow
def test_benchmark_runs_the_trainers_step(benchmark_model):
  out = benchmark_model.run_jax("train", 64, 2, 2, _TINY)
  assert len(out["times"]) == 2 and all(t > 0 for t in out["times"])
  assert out["program_mb"] > 0
