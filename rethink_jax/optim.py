"""The paper's optimizer: SGD with momentum, masked weight decay, linear warmup, step decay.

Detectron's recipe, which "Rethinking ImageNet Pre-training" keeps for every schedule length:
  * SGD, momentum 0.9, weight decay 1e-4, LR 0.02 at 16 images per step (scaled linearly with the
    batch: Goyal et al.'s rule);
  * a linear warmup from `warmup_factor * lr` to `lr` over the first `warmup_steps` steps;
  * LR x0.1 at the last 60k and again at the last 20k iterations (at batch 16) of schedules of 2x
    and longer: 2x = 180k decays at 120k and 160k, 3x = 270k at 210k and 250k. Shorter schedules
    keep Detectron's 1x proportions (decays at 2/3 and 8/9 of the run: 1x = 90k at 60k and 80k),
    which agree with the last-60k/20k rule exactly at 2x, so the rule is continuous in the length.

The update is PyTorch's SGD (which Detectron2 uses): v <- m * v + (g + wd * p); p <- p - lr * v.
optax's `add_decayed_weights` followed by `sgd(momentum)` computes exactly that.
"""

import collections
from collections.abc import Iterable, Mapping, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

# The paper's reference point: 1x = 90k iterations of 16 images, decays at the last 60k / 20k.
BASE_BATCH_SIZE = 16
BASE_LR = 0.02
ITERS_1X = 90_000
DECAY_LAST_ITERS = (60_000, 20_000)


def _scaled(iters: float, batch_size: int, base_batch_size: int) -> int:
  """Iterations at `base_batch_size` -> iterations seeing as many images at `batch_size`."""
  return int(round(iters * base_batch_size / batch_size))


def schedule(
  multiple: float,
  batch_size: int = BASE_BATCH_SIZE,
  *,
  base_lr: float = BASE_LR,
  base_batch_size: int = BASE_BATCH_SIZE,
  iters_1x: int = ITERS_1X,
  decay_last_iters: Sequence[int] = DECAY_LAST_ITERS,
) -> dict:
  """The paper's schedule `multiple`x at `batch_size` images per step.

  Args:
    multiple: schedule length in units of 1x (= `iters_1x` iterations at `base_batch_size`);
      fractions are allowed (0.5 = half of 1x).
    batch_size: global images per step.
    base_lr: LR at `base_batch_size` images per step; scaled linearly to `batch_size`.
    base_batch_size, iters_1x, decay_last_iters: the reference point (16, 90k, (60k, 20k)).

  Returns:
    dict(total_steps: int, decay_steps: tuple of ints (ascending, each in (0, total_steps)),
         base_lr: float, the LR at `batch_size`).
    For example schedule(1) = {total_steps 90000, decay_steps (60000, 80000), base_lr 0.02},
    schedule(3) = {270000, (210000, 250000), 0.02} and schedule(9, 64) = {202500,
    (187500, 197500), 0.08} (Detectron2's 9x scratch config).
  """
  if multiple <= 0:
    raise ValueError(f"schedule multiple must be > 0, got {multiple}")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be > 0, got {batch_size}")
  total = _scaled(multiple * iters_1x, batch_size, base_batch_size)
  last = [_scaled(d, batch_size, base_batch_size) for d in decay_last_iters]
  if multiple * iters_1x >= 3 * max(decay_last_iters):
    decays = tuple(total - d for d in last)
  else:  # Below 2x: the 1x proportions (fractions 1 - d / (3 * max d)).
    span = 3 * max(decay_last_iters)
    decays = tuple(int(round(total * (1 - d / span))) for d in decay_last_iters)
  return dict(
    total_steps=total,
    decay_steps=tuple(sorted(decays)),
    base_lr=base_lr * batch_size / base_batch_size,
  )


def resolve_schedule(schedule_config: Any, optim_config: Any, batch_size: int) -> dict:
  """The run's schedule from config.schedule, config.optim and config.batch_size.

  config.schedule: multiple (float, in units of 1x), base_batch_size (16), total_steps (<= 0:
    derived from multiple by `schedule`), decay_steps (empty: derived by `schedule`; explicit
    values are used as given), decay_factor (0.1).
  config.optim: base_lr (the LR at schedule.base_batch_size images per step; scaled linearly to
    batch_size), warmup_steps, warmup_factor.
  batch_size: global images per step.

  Returns:
    dict(total_steps, decay_steps, decay_factor, base_lr (at batch_size), warmup_steps,
         warmup_factor, batch_size).
  """
  s, o = schedule_config, optim_config
  base_bs = int(s.get("base_batch_size", BASE_BATCH_SIZE))
  bs = int(batch_size)
  lr = float(o.base_lr) * bs / base_bs
  total = int(s.get("total_steps", 0) or 0)
  decays = tuple(int(d) for d in (s.get("decay_steps", ()) or ()))
  if total <= 0:
    derived = schedule(float(s.multiple), bs, base_lr=float(o.base_lr), base_batch_size=base_bs)
    total = derived["total_steps"]
    if not decays:
      decays = derived["decay_steps"]
  # Decay steps past the end are allowed (they never happen): a run stopped early and resumed
  # with a longer schedule keeps the same LR at every step.
  if any(d < 0 for d in decays):
    raise ValueError(f"decay steps must be >= 0, got {decays}")
  return dict(
    total_steps=total,
    decay_steps=tuple(sorted(decays)),
    decay_factor=float(s.get("decay_factor", 0.1)),
    base_lr=lr,
    warmup_steps=int(o.get("warmup_steps", 0)),
    warmup_factor=float(o.get("warmup_factor", 1.0)),
    batch_size=bs,
  )


def lr_schedule(
  base_lr: float,
  decay_steps: Sequence[int],
  *,
  decay_factor: float = 0.1,
  warmup_steps: int = 0,
  warmup_factor: float = 1.0,
) -> optax.Schedule:
  """step (int scalar) -> LR (float32 scalar): Detectron2's WarmupMultiStepLR.

  lr(step) = base_lr * warmup(step) * decay_factor ** #{d in decay_steps: d <= step}
  warmup(step) = warmup_factor + (1 - warmup_factor) * step / warmup_steps for step < warmup_steps,
  else 1. Step 0 is the first update.
  """
  # A product, not optax.join_schedules: decays falling inside the warmup still apply there.
  decays = collections.Counter(int(d) for d in decay_steps)
  decay = optax.piecewise_constant_schedule(
    base_lr, {d: decay_factor**n for d, n in decays.items()} or None
  )

  def fn(step):
    step = jnp.asarray(step, jnp.int32)
    lr = decay(step)
    if warmup_steps > 0:
      # Not optax.linear_schedule: its init + (end - init) form loses 1e-5 of a 0.001 start.
      alpha = jnp.minimum(step.astype(jnp.float32) / warmup_steps, 1.0)
      lr = lr * (warmup_factor * (1.0 - alpha) + alpha)
    return jnp.asarray(lr, jnp.float32)

  return fn


def _path_keys(path) -> tuple:
  """A jax tree path -> tuple of str keys."""
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def _as_tuple(prefix) -> tuple:
  if isinstance(prefix, str):
    return tuple(p for p in prefix.split("/") if p)
  return tuple(str(p) for p in prefix)


def is_norm_param(path: Sequence[str]) -> bool:
  """True for a norm layer's parameter: any path component named "norm" (layers.Conv2d's norm
  submodule) or starting with "norm"/"gn"/"bn" (a standalone norm module)."""
  return any(
    p == "norm" or p.lower().startswith(("norm", "gn", "bn", "groupnorm", "batchnorm"))
    for p in path[:-1]
  )


def is_bias_param(path: Sequence[str]) -> bool:
  """True for a conv/dense bias (not a norm's bias)."""
  return path[-1] == "bias" and not is_norm_param(path)


def param_labels(params: Any, frozen_prefixes: Iterable = ()) -> Any:
  """params tree -> same-structure tree of "frozen" | "norm" | "bias" | "weight" labels.

  frozen_prefixes: paths ("a/b" strings or key tuples) from the params root; every parameter under
  one of them is "frozen" (gets a zero update: no gradient step, no weight decay, no momentum).
  """
  prefixes = [_as_tuple(p) for p in frozen_prefixes]

  def label(path, _):
    keys = _path_keys(path)
    if any(keys[: len(p)] == p for p in prefixes):
      return "frozen"
    if is_norm_param(keys):
      return "norm"
    if is_bias_param(keys):
      return "bias"
    return "weight"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
  optim_config: Any, sched: Mapping[str, Any], params: Any, frozen_prefixes: Iterable = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation of the recipe and its LR function.

  Args:
    optim_config: config.optim: momentum (0.9), weight_decay (1e-4), weight_decay_norm (0.0:
      Detectron2's scratch configs; None = same as weight_decay), weight_decay_bias (None = same
      as weight_decay), grad_clip_norm (0 / None = off; else clip the global norm of the
      trainable gradients), nesterov (False).
    sched: resolve_schedule(...)'s dict (base_lr, decay_steps, decay_factor, warmup_*).
    params: the params tree (only its structure is used, to build the masks).
    frozen_prefixes: param paths that get zero updates (resnet.frozen_param_prefixes, rooted at
      the params tree).

  Returns:
    (tx, lr_fn): tx is an optax.GradientTransformation over the whole params tree; lr_fn(step)
    gives the LR of update `step` (0-based), for logging.
  """
  o = optim_config
  lr_fn = lr_schedule(
    sched["base_lr"],
    sched["decay_steps"],
    decay_factor=sched["decay_factor"],
    warmup_steps=sched["warmup_steps"],
    warmup_factor=sched["warmup_factor"],
  )
  wd = float(o.get("weight_decay", 1e-4))
  wd_norm = o.get("weight_decay_norm", 0.0)
  wd_norm = wd if wd_norm is None else float(wd_norm)
  wd_bias = o.get("weight_decay_bias", None)
  wd_bias = wd if wd_bias is None else float(wd_bias)
  labels = param_labels(params, frozen_prefixes)

  def decay_on(label_name):
    return jax.tree_util.tree_map(lambda l: l == label_name, labels)

  # Frozen leaves: zero their gradients first (they are zero already under stop_gradient, but
  # this keeps them out of the clipping norm whatever the model does); no decay mask selects
  # them, so their momentum stays 0 and their update is exactly 0.
  frozen = jax.tree_util.tree_map(lambda l: l == "frozen", labels)
  parts = [optax.masked(optax.set_to_zero(), frozen)]
  clip = o.get("grad_clip_norm", 0.0)
  if clip:
    parts.append(optax.clip_by_global_norm(float(clip)))
  # One add_decayed_weights per decay rate (frozen leaves are in none of the masks).
  for name, rate in (("weight", wd), ("bias", wd_bias), ("norm", wd_norm)):
    if rate:
      parts.append(optax.add_decayed_weights(rate, mask=decay_on(name)))
  parts.append(
    optax.sgd(
      lr_fn, momentum=float(o.get("momentum", 0.9)) or None, nesterov=bool(o.get("nesterov", False))
    )
  )
  tx = optax.chain(*parts)
  return tx, lr_fn


def count_params(tree: Any) -> int:
  """Number of scalars in a tree of arrays (or ShapeDtypeStructs)."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
