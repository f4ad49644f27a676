"""config.model.dtype = "bfloat16": convs and matmuls in bf16; params, norm statistics, losses,
box arithmetic and the optimizer in float32.

The tiny Mask R-CNN is trained for a few dozen steps on one fixed batch of the tiny shapes set
with the trainer's own step (rethink_jax.train.build_parts): losses stay finite and fall,
every parameter and optimizer leaf stays float32; the traced program convolves in bf16.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_shapes
from rethink_jax import optim
from rethink_jax import train
from rethink_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp("tfds_bf16"))
  shapes.ShapesInstances(config="tiny", data_dir=data_dir).download_and_prepare()
  c = tiny_shapes.get_config(str(STEPS))
  c.data.data_dir = data_dir
  c.data.num_parallel_calls = 1
  c.model.dtype = "bfloat16"
  c.schedule.decay_steps = (10 * STEPS,)  # no decay: a constant LR after the warmup
  batch = next(stream.make_train_iterator(c.data, c.batch_size, seed=0))
  sched = optim.resolve_schedule(c.schedule, c.optim, c.batch_size)
  rng = jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 30)))
  sample = train.init_batch(batch)
  parts = train.build_parts(c, sched, trainer.make_mesh(jax.devices()[:1]), sample)
  state = parts.init(rng, sample)
  return dict(config=c, batch=batch, parts=parts, model=parts.model, state=state, rng=rng)


def _eqns(jaxpr):
  """Every equation of a (closed) jaxpr, recursing into sub-jaxprs (pjit, custom_vjp, scan...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub)


def test_convs_and_matmuls_run_in_bfloat16(setup):
  model, state, batch = setup["model"], setup["state"], setup["batch"]
  variables = {"params": state["params"], **state["collections"]}

  def loss(params):
    losses, _ = model.apply(
      {**variables, "params": params},
      batch,
      train=True,
      rngs={"sampling": setup["rng"]},
      mutable=["batch_stats"],
    )
    return losses

  closed = jax.make_jaxpr(loss)(state["params"])
  convs = [e for e in _eqns(closed.jaxpr) if e.primitive.name == "conv_general_dilated"]
  dots = [e for e in _eqns(closed.jaxpr) if e.primitive.name == "dot_general"]
  assert convs, "no convolution traced"
  for e in convs:  # every conv of the backbone, FPN, RPN and heads
    assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2, e
    assert e.outvars[0].aval.dtype == jnp.bfloat16, e
  # The 1x1 convs, the fc layers and the mask predictor are matmuls: bf16 too, except the box
  # arithmetic / RoIAlign interpolation weights (float32 by design).
  bf16_dots = [e for e in dots if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  assert len(bf16_dots) >= 5, [tuple(v.aval.dtype for v in e.invars) for e in dots]
  # Losses are float32 scalars.
  out = jax.eval_shape(loss, state["params"])
  assert all(
    v.dtype == jnp.float32 and v.shape == () for k, v in out.items() if k.startswith("loss_")
  ), out


def test_bfloat16_trains_with_float32_state(setup):
  step = setup["parts"].train_step
  state = jax.tree_util.tree_map(jnp.copy, setup["state"])  # the step donates its state
  batch = setup["batch"]
  totals = []
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    totals.append(float(metrics["total_loss"]))
  totals = np.asarray(totals)
  print("bf16 total loss per step:", np.round(totals, 3).tolist())
  assert np.all(np.isfinite(totals)), totals
  assert int(metrics["bad_step"]) == -1
  # Overfitting one batch: the loss falls clearly (averages damp the sampling noise).
  assert totals[-5:].mean() < 0.8 * totals[:5].mean(), totals
  for name, tree in (
    ("params", state["params"]),
    ("opt_state", state["opt_state"]),
    ("collections", state["collections"]),
  ):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32, (name, jax.tree_util.keystr(path), leaf.dtype)
