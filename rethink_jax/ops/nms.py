"""Greedy non-maximum suppression at static shape (vmaps over images), as torchvision's.

The algorithm has two exact forms, chosen when lowering (xla_cpu.nms_indices): on CPU a loop of
one step per box sorted by score, elsewhere one step per tile of sorted boxes.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from rethink_jax.ops import xla_cpu

Array = jax.Array


def _check(boxes: Array, scores: Array, classes: Optional[Array] = None) -> None:
  if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
    raise ValueError(
      f"nms needs boxes (N, 4) and scores (N,), got {boxes.shape} and {scores.shape}"
    )
  if classes is not None and classes.shape != scores.shape:
    raise ValueError(f"classes must have shape {scores.shape}, got {classes.shape}")


def nms(boxes: Array, scores: Array, iou_threshold: float, max_output: int) -> tuple[Array, Array]:
  """Greedy NMS, equal to torchvision.ops.nms truncated to max_output (for tie-free scores).

  Args:
    boxes: (N, 4) xyxy.
    scores: (N,); -inf marks padding, never kept.
    iou_threshold: a box is suppressed by a kept box when their IoU is > iou_threshold.
    max_output: static int, the number of output slots.

  Returns:
    indices: (max_output,) int32 kept indices in decreasing score order, padded with -1.
    num_valid: int32 scalar, the number of kept indices.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  _check(boxes, scores)
  return xla_cpu.nms_indices(boxes, scores, None, iou_threshold, max_output)


def batched_nms(
  boxes: Array, scores: Array, classes: Array, iou_threshold: float, max_output: int
) -> tuple[Array, Array]:
  """Class-aware NMS (boxes suppress only boxes of the same class), like torchvision's batched_nms.

  Args:
    boxes: (N, 4) xyxy.
    scores: (N,); -inf marks padding.
    classes: (N,) int class ids.
    iou_threshold: float.
    max_output: static int.

  Returns:
    indices: (max_output,) int32 in decreasing score order, padded with -1; num_valid: int32.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  classes = jnp.asarray(classes)
  _check(boxes, scores, classes)
  return xla_cpu.nms_indices(boxes, scores, classes, iou_threshold, max_output)
