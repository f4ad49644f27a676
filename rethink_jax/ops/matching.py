"""Detectron2's Matcher at static shape, with padded ground truth."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def match(
  iou: jax.typing.ArrayLike,
  gt_valid: jax.typing.ArrayLike,
  thresholds: Sequence[float],
  labels: Sequence[int],
  allow_low_quality_matches: bool,
) -> tuple[jax.Array, jax.Array]:
  """Assign each prediction (column) to a ground-truth box (row).

  Detectron2 Matcher semantics: with thresholds t_1 < ... < t_k and sentinels t_0 = -inf,
  t_{k+1} = +inf, a prediction whose best IoU v satisfies t_{i} <= v < t_{i+1} gets labels[i].
  With allow_low_quality_matches, for each valid ground truth g every prediction attaining g's
  maximum IoU gets label 1 (matched_gt keeps the argmax; like Detectron2 this includes a valid
  g whose maximum IoU is 0, which the data pipeline avoids by dropping empty boxes).
  Invalid (padded) ground truth never matches. Without any valid ground truth every
  prediction gets labels[0] (background, 0, in every standard config) and matched_gt 0.

  Args:
    iou: (G, N) float match quality (IoU) between G ground-truth boxes and N predictions.
    gt_valid: (G,) bool, False for padded ground truth.
    thresholds: increasing floats, e.g. (0.3, 0.7) (RPN) or (0.5,) (ROI heads).
    labels: len(thresholds) + 1 ints in {-1, 0, 1}, e.g. (0, -1, 1) or (0, 1).
    allow_low_quality_matches: bool (static).

  Returns:
    matched_gt: (N,) int32 index of the best ground truth (argmax over valid rows, first on ties).
    match_labels: (N,) int32 in {-1, 0, 1}.
  """
  iou = jnp.asarray(iou, jnp.float32)
  gt_valid = jnp.asarray(gt_valid, bool)
  if iou.ndim != 2 or gt_valid.shape != iou.shape[:1]:
    raise ValueError(
      f"match needs iou (G, N) and gt_valid (G,), got {iou.shape} and {gt_valid.shape}"
    )
  thresholds = [float(t) for t in thresholds]
  if any(a > b for a, b in zip(thresholds[:-1], thresholds[1:])):
    raise ValueError(f"thresholds must be increasing, got {thresholds}")
  if len(labels) != len(thresholds) + 1:
    raise ValueError(f"need len(thresholds) + 1 labels, got {labels} for {thresholds}")

  if iou.shape[0] == 0:  # no ground-truth rows at all (static): everything background
    return (jnp.zeros(iou.shape[1:], jnp.int32), jnp.full(iou.shape[1:], labels[0], jnp.int32))

  # Padded rows get -1 (< any IoU) so that they never win the argmax.
  masked = jnp.where(gt_valid[:, None], iou, -1.0)
  matched_gt = jnp.argmax(masked, axis=0).astype(jnp.int32)
  matched_vals = jnp.max(masked, axis=0)

  bounds = [-jnp.inf] + thresholds + [jnp.inf]
  match_labels = jnp.ones(iou.shape[1:], jnp.int32)
  for label, low, high in zip(labels, bounds[:-1], bounds[1:]):
    in_range = (matched_vals >= low) & (matched_vals < high)
    match_labels = jnp.where(in_range, jnp.int32(label), match_labels)

  if allow_low_quality_matches:
    best_per_gt = jnp.max(masked, axis=1, keepdims=True)
    is_best = (masked == best_per_gt) & gt_valid[:, None]
    match_labels = jnp.where(jnp.any(is_best, axis=0), 1, match_labels)

  any_valid = jnp.any(gt_valid)
  match_labels = jnp.where(any_valid, match_labels, jnp.int32(labels[0]))
  matched_gt = jnp.where(any_valid, matched_gt, 0)
  return matched_gt, match_labels
