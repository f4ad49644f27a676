"""Greedy non-maximum suppression at static shape (vmaps over images).

Boxes are sorted by decreasing score once; a while_loop then walks the sorted list, and each
box that survives suppresses, in one vectorised step, every box overlapping it by more than
the threshold. IoU rows are computed only for kept boxes and the loop stops once `max_output`
boxes are kept or padding (-inf score) is reached, so the work is about kept * N IoUs, as in
torchvision's CPU kernel, and never an N x N matrix in memory.
"""
import jax
import jax.numpy as jnp


def _check(boxes, scores, extra=None):
  if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
    raise ValueError(f"nms needs boxes (N, 4) and scores (N,), got {boxes.shape} and {scores.shape}")
  if extra is not None and extra.shape != scores.shape:
    raise ValueError(f"classes must have shape {scores.shape}, got {extra.shape}")


def _greedy_nms(boxes, scores, classes, iou_threshold, max_output):
  n = boxes.shape[0]
  max_output = int(max_output)
  order = jnp.argsort(-scores, stable=True).astype(jnp.int32)
  b = boxes[order]
  s = scores[order]
  c = None if classes is None else classes[order]
  x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
  area = (x2 - x1) * (y2 - y1)

  def cond(state):
    i, count, _, _ = state
    return (i < n) & (count < max_output) & (s[jnp.minimum(i, n - 1)] > -jnp.inf)

  def body(state):
    i, count, suppressed, keep = state
    take = ~suppressed[i] & (s[i] > -jnp.inf) & (count < max_output)
    keep = jnp.where(take, keep.at[count].set(order[i], mode="drop"), keep)
    # IoU of box i with every box (same formula and `>` test as torchvision's kernel).
    w = jnp.maximum(jnp.minimum(x2[i], x2) - jnp.maximum(x1[i], x1), 0.0)
    h = jnp.maximum(jnp.minimum(y2[i], y2) - jnp.maximum(y1[i], y1), 0.0)
    inter = w * h
    over = inter / (area[i] + area - inter) > iou_threshold
    if c is not None:
      over = over & (c == c[i])
    suppressed = suppressed | (over & take)
    return i + 1, count + take.astype(jnp.int32), suppressed, keep

  state = (jnp.int32(0), jnp.int32(0), jnp.zeros((n,), bool), jnp.full((max_output,), -1, jnp.int32))
  _, count, _, keep = jax.lax.while_loop(cond, body, state)
  return keep, count


def nms(boxes, scores, iou_threshold, max_output):
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
  return _greedy_nms(boxes, scores, None, iou_threshold, max_output)


def batched_nms(boxes, scores, classes, iou_threshold, max_output):
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
  return _greedy_nms(boxes, scores, classes, iou_threshold, max_output)
