"""Optimizer and schedule: the paper's rule, Detectron2's warmup, PyTorch SGD semantics, labels."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rethink_jax import optim


@pytest.mark.parametrize("multiple", [0.5, 1, 1.5, 2, 3, 4, 5, 6, 9])
@pytest.mark.parametrize("batch_size", [8, 16, 32, 64, 256])
def test_schedule_follows_paper_rule(multiple, batch_size):
  s = optim.schedule(multiple, batch_size)
  images_1x = 90_000 * 16
  assert s["total_steps"] == round(multiple * images_1x / batch_size)
  if multiple >= 2:
    # LR x0.1 at the last 60k and the last 20k iterations (of 16 images).
    assert s["decay_steps"] == (
      s["total_steps"] - round(60_000 * 16 / batch_size),
      s["total_steps"] - round(20_000 * 16 / batch_size),
    )
  else:
    # Shorter: Detectron's 1x proportions (60k and 80k of 90k).
    assert s["decay_steps"] == (round(s["total_steps"] * 2 / 3), round(s["total_steps"] * 8 / 9))
  assert math.isclose(s["base_lr"], 0.02 * batch_size / 16)
  # Same number of images seen whatever the batch.
  assert abs(s["total_steps"] * batch_size - multiple * images_1x) <= batch_size


def test_schedule_known_values():
  assert optim.schedule(1) == dict(total_steps=90_000, decay_steps=(60_000, 80_000), base_lr=0.02)
  assert optim.schedule(2)["decay_steps"] == (120_000, 160_000)
  assert optim.schedule(3)["decay_steps"] == (210_000, 250_000)
  assert optim.schedule(1, 8)["decay_steps"] == (120_000, 160_000)
  assert optim.schedule(6)["total_steps"] == 540_000
  # Detectron2's scratch_mask_rcnn_R_50_FPN_9x_gn: batch 64, LR 0.08, 202,500 iters, decays
  # 187,500 / 197,500.
  s = optim.schedule(9, 64)
  assert s["total_steps"] == 202_500 and s["decay_steps"] == (187_500, 197_500)
  assert math.isclose(s["base_lr"], 0.08)
  # The 10k-image experiment's lengths (pre-trained 60k, scratch 220k iterations at batch 16).
  assert optim.schedule(60 / 90)["decay_steps"] == (40_000, 53_333)
  assert optim.schedule(220 / 90)["decay_steps"] == (160_000, 200_000)
  with pytest.raises(ValueError):
    optim.schedule(0)


def test_resolve_schedule_explicit_and_derived():
  sc = ml_collections.ConfigDict(
    dict(multiple=2, base_batch_size=16, total_steps=0, decay_steps=(), decay_factor=0.1)
  )
  oc = ml_collections.ConfigDict(dict(base_lr=0.02, warmup_steps=500, warmup_factor=1 / 3))
  r = optim.resolve_schedule(sc, oc, 32)
  assert r["total_steps"] == 90_000 and r["decay_steps"] == (60_000, 80_000)
  assert math.isclose(r["base_lr"], 0.04)
  sc.total_steps, sc.decay_steps = 100, (90, 50)
  r = optim.resolve_schedule(sc, oc, 32)
  assert r["total_steps"] == 100 and r["decay_steps"] == (50, 90)
  sc.decay_steps = (-1,)
  with pytest.raises(ValueError):
    optim.resolve_schedule(sc, oc, 32)


@pytest.mark.parametrize(
  "base, wf, wi, decays, end",
  [
    (0.02, 0.001, 1000, (60_000, 80_000), 90_000),
    (0.5, 0.25, 8, (3, 5, 5), 20),  # decays inside the warmup, one of them twice
    (0.1, 1 / 3, 0, (0, 7), 12),  # no warmup, a decay at step 0
  ],
)
def test_lr_schedule_matches_detectron2_warmup_multistep(base, wf, wi, decays, end):
  fn = jax.jit(optim.lr_schedule(base, decays, warmup_steps=wi, warmup_factor=wf))

  def reference(it):  # Detectron2's WarmupMultiStepLR, written out.
    factor = 1.0
    if it < wi:
      alpha = it / wi
      factor = wf * (1 - alpha) + alpha
    return base * factor * 0.1 ** sum(it >= d for d in decays)

  steps = sorted({0, 1, wi // 2, max(wi - 1, 0), wi, *decays, *(d - 1 for d in decays), end - 1})
  steps += list(np.random.default_rng().integers(0, end, 20))
  for it in steps:
    if it >= 0:
      np.testing.assert_allclose(float(fn(it)), reference(int(it)), rtol=1e-6, err_msg=str(it))


def _tree(rng):
  """A params tree shaped like the model's (conv+norm, frozen stem, bias, fc)."""
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
    "backbone": {
      "bottom_up": {
        "stem": {"conv1": {"kernel": f(3, 3, 3, 4), "norm": {"scale": f(4), "bias": f(4)}}},
        "res2": {"0": {"conv1": {"kernel": f(1, 1, 4, 4), "norm": {"scale": f(4), "bias": f(4)}}}},
      },
      "fpn_lateral2": {"kernel": f(1, 1, 4, 8), "bias": f(8)},
    },
    "roi_heads": {"box_head": {"fc1": {"kernel": f(6, 5), "bias": f(5)}}},
  }


FROZEN = [("backbone", "bottom_up", "stem")]


def test_param_labels():
  params = _tree(np.random.default_rng())
  labels = optim.param_labels(params, FROZEN)
  bu = labels["backbone"]["bottom_up"]
  assert (
    bu["stem"]["conv1"]["kernel"] == "frozen" and bu["stem"]["conv1"]["norm"]["scale"] == "frozen"
  )
  assert bu["res2"]["0"]["conv1"]["kernel"] == "weight"
  assert bu["res2"]["0"]["conv1"]["norm"]["bias"] == "norm"
  assert labels["backbone"]["fpn_lateral2"]["bias"] == "bias"
  assert labels["roi_heads"]["box_head"]["fc1"]["bias"] == "bias"
  # "a/b" string prefixes work like key tuples.
  assert optim.param_labels(params, ["backbone/bottom_up/stem"]) == labels


@pytest.mark.parametrize("clip", [0.0, 1.5])
def test_matches_torch_sgd(clip):
  """Several steps of our tx == torch.optim.SGD (momentum, per-group weight decay) driven by
  Detectron2-style LR factors, with a frozen group that never moves."""
  import torch  # pylint: disable=g-import-not-at-top

  seed = int(np.random.SeedSequence().entropy % 2**31)
  rng = np.random.default_rng(seed)
  params = _tree(rng)
  oc = ml_collections.ConfigDict(
    dict(
      momentum=0.9,
      weight_decay=1e-4,
      weight_decay_norm=0.0,
      weight_decay_bias=None,
      grad_clip_norm=clip,
    )
  )
  sched = dict(
    base_lr=0.5, decay_steps=(3, 5), decay_factor=0.1, warmup_steps=2, warmup_factor=0.25
  )
  tx, lr_fn = optim.make_optimizer(oc, sched, params, FROZEN)
  labels = optim.param_labels(params, FROZEN)

  flat, treedef = jax.tree_util.tree_flatten(params)
  flat_labels = jax.tree_util.tree_leaves(labels)
  tparams = [torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True) for x in flat]
  groups = [
    dict(
      params=[p for p, l in zip(tparams, flat_labels) if l in ("weight", "bias")], weight_decay=1e-4
    ),
    dict(params=[p for p, l in zip(tparams, flat_labels) if l == "norm"], weight_decay=0.0),
  ]
  topt = torch.optim.SGD(groups, lr=sched["base_lr"], momentum=0.9)
  state = tx.init(params)
  stem0 = np.asarray(params["backbone"]["bottom_up"]["stem"]["conv1"]["kernel"])
  for step in range(7):
    grads = [rng.normal(size=x.shape).astype(np.float32) for x in flat]
    updates, state = tx.update(
      jax.tree_util.tree_unflatten(treedef, [jnp.asarray(g) for g in grads]), state, params
    )
    params = optax.apply_updates(params, updates)
    # torch: clip the trainable grads by global norm, then SGD with the schedule's LR.
    tg = [torch.tensor(g, dtype=torch.float64) for g in grads]
    train_idx = [i for i, l in enumerate(flat_labels) if l != "frozen"]
    if clip:
      norm = math.sqrt(sum(float((tg[i] ** 2).sum()) for i in train_idx))
      tg = [g * min(1.0, clip / norm) for g in tg]
    for i, p in enumerate(tparams):
      p.grad = tg[i] if flat_labels[i] != "frozen" else None
    for g in topt.param_groups:
      g["lr"] = float(lr_fn(step))
    topt.step()
    ours = jax.tree_util.tree_leaves(params)
    for i, (a, b) in enumerate(zip(ours, tparams)):
      np.testing.assert_allclose(
        np.asarray(a),
        b.detach().numpy(),
        rtol=2e-5,
        atol=2e-6,
        err_msg=f"seed {seed} step {step} leaf {i} {flat_labels[i]}",
      )
  # Frozen leaves never moved.
  np.testing.assert_array_equal(
    np.asarray(params["backbone"]["bottom_up"]["stem"]["conv1"]["kernel"]), stem0
  )
  np.testing.assert_allclose(float(lr_fn(0)), 0.5 * 0.25, rtol=1e-6)
  np.testing.assert_allclose(float(lr_fn(5)), 0.5 * 0.01, rtol=1e-6)
