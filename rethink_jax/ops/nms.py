"""Greedy non-maximum suppression at static shape (vmaps over images).

Two exact implementations of the same greedy rule, chosen by backend (lax.platform_dependent):
- CPU: boxes sorted by decreasing score; a while_loop walks the sorted list, and each box that
  survives suppresses, in one vectorised step, every box overlapping it by more than the
  threshold. IoU rows are computed only for kept boxes and the loop stops once `max_output`
  boxes are kept or padding (-inf score) is reached: about kept * N IoUs, as in torchvision's
  CPU kernel, never an N x N matrix.
- GPU / TPU: one step per tile of T sorted boxes (as in the TPU Mask R-CNN's padded NMS): the
  tile is first suppressed by every box kept in earlier tiles (a T x N IoU block), then the
  greedy order inside the tile is resolved by iterating keep_i = cand_i & !any_{j<i}(keep_j &
  iou_ji > t) to its fixed point (unique, and equal to the greedy result; a few iterations in
  practice, at most T). About N / T sequential steps instead of one per box.
"""
import jax
import jax.numpy as jnp


def _check(boxes, scores, extra=None):
  if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
    raise ValueError(f"nms needs boxes (N, 4) and scores (N,), got {boxes.shape} and {scores.shape}")
  if extra is not None and extra.shape != scores.shape:
    raise ValueError(f"classes must have shape {scores.shape}, got {extra.shape}")


def _greedy_nms(boxes, scores, classes, iou_threshold, max_output):
  """The CPU implementation: one while_loop step per sorted box."""
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


def _pairwise_over(a, b, ca, cb, iou_threshold):
  """Coordinates (x1, y1, x2, y2) of (T,) and of (N,) -> (T, N) bool: IoU > threshold.

  With classes ca (T,), cb (N,) only boxes of the same class count as overlapping.
  """
  ax1, ay1, ax2, ay2 = a
  bx1, by1, bx2, by2 = b
  area_a = (ax2 - ax1) * (ay2 - ay1)
  area_b = (bx2 - bx1) * (by2 - by1)
  w = jnp.maximum(jnp.minimum(ax2[:, None], bx2[None, :]) - jnp.maximum(ax1[:, None], bx1[None, :]), 0.0)
  h = jnp.maximum(jnp.minimum(ay2[:, None], by2[None, :]) - jnp.maximum(ay1[:, None], by1[None, :]), 0.0)
  inter = w * h
  over = inter / (area_a[:, None] + area_b[None, :] - inter) > iou_threshold
  if ca is not None:
    over = over & (ca[:, None] == cb[None, :])
  return over


def _tiled_nms(boxes, scores, classes, iou_threshold, max_output, tile=512):
  """The accelerator implementation: one step per tile of sorted boxes (see module doc)."""
  n = boxes.shape[0]
  max_output = int(max_output)
  tile = int(min(tile, n))
  num_tiles = -(-n // tile)
  pad = num_tiles * tile - n
  order = jnp.argsort(-scores, stable=True).astype(jnp.int32)
  # Four (N + pad,) coordinate vectors rather than one (N + pad, 4) array: lane-dense on TPU, and
  # libtpu 0.0.42.1 crashes compiling for v5p the fusion of padding an (N, 4) array and slicing
  # its columns (Check failed: llo::CouldLtS32 in math_util.cc).
  sorted_boxes = boxes[order]
  b = tuple(jnp.pad(sorted_boxes[:, i], (0, pad)) for i in range(4))
  valid = jnp.pad(scores[order] > -jnp.inf, (0, pad))
  c = None if classes is None else jnp.pad(classes[order], (0, pad))
  earlier = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # [j, i]: j before i

  def cond(state):
    t, kept = state
    return (t < num_tiles) & (jnp.sum(kept) < max_output)

  def body(state):
    t, kept = state
    start = t * tile
    bt = tuple(jax.lax.dynamic_slice_in_dim(v, start, tile) for v in b)
    ct = None if c is None else jax.lax.dynamic_slice_in_dim(c, start, tile)
    # Suppressed by a box kept in an earlier tile (kept is False for this and later tiles).
    by_kept = jnp.any(_pairwise_over(bt, b, ct, c, iou_threshold) & kept[None, :], axis=1)
    cand = jax.lax.dynamic_slice_in_dim(valid, start, tile) & ~by_kept
    over = _pairwise_over(bt, bt, ct, ct, iou_threshold) & earlier

    def step(carry):
      keep, _ = carry
      new = cand & ~jnp.any(over & keep[:, None], axis=0)
      return new, jnp.any(new != keep)

    keep, _ = jax.lax.while_loop(lambda x: x[1], step, (cand, jnp.bool_(True)))
    return t + 1, jax.lax.dynamic_update_slice_in_dim(kept, keep, start, 0)

  _, kept = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.zeros((num_tiles * tile,), bool)))
  kept = kept[:n]
  count = jnp.minimum(jnp.sum(kept), max_output).astype(jnp.int32)
  # Kept positions first, in sorted order.
  k = min(max_output, n)
  _, pos = jax.lax.top_k(jnp.where(kept, -jnp.arange(n, dtype=jnp.float32), -jnp.inf), k)
  pos = jnp.pad(pos, (0, max_output - k))
  slot = jnp.arange(max_output)
  return jnp.where(slot < count, order[pos], -1).astype(jnp.int32), count


def _nms_any_backend(boxes, scores, classes, iou_threshold, max_output):
  return jax.lax.platform_dependent(
      boxes, scores, classes,
      cpu=lambda b, s, c: _greedy_nms(b, s, c, iou_threshold, max_output),
      default=lambda b, s, c: _tiled_nms(b, s, c, iou_threshold, max_output))


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
  return _nms_any_backend(boxes, scores, None, iou_threshold, max_output)


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
  return _nms_any_backend(boxes, scores, classes, iou_threshold, max_output)
