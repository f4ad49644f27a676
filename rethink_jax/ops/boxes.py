"""Box arithmetic on xyxy boxes in absolute pixels (width = x2 - x1, as in Detectron2).

All functions are pure jnp, broadcast over leading dimensions and run under jit/vmap.
Box arithmetic is done in float32 whatever the input dtype.
"""

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _check_boxes(name: str, boxes: Array) -> None:
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f"{name} must have shape (..., 4), got {boxes.shape}")


def box_area(boxes: ArrayLike) -> Array:
  """Area of boxes (..., 4) xyxy -> (...,). Degenerate boxes may give <= 0."""
  boxes = jnp.asarray(boxes, jnp.float32)
  _check_boxes("boxes", boxes)
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: ArrayLike, boxes2: ArrayLike) -> Array:
  """Pairwise IoU, equal to torchvision.ops.box_iou.

  Args:
    boxes1: (..., N, 4) xyxy.
    boxes2: (..., M, 4) xyxy; leading dims broadcast with boxes1's.

  Returns:
    (..., N, M) float32. Pairs of empty boxes give NaN (0 / 0), like torchvision.
  """
  boxes1 = jnp.asarray(boxes1, jnp.float32)
  boxes2 = jnp.asarray(boxes2, jnp.float32)
  if boxes1.ndim < 2 or boxes2.ndim < 2:
    raise ValueError(
      f"box_iou needs (..., N, 4) and (..., M, 4), got {boxes1.shape} and {boxes2.shape}"
    )
  _check_boxes("boxes1", boxes1)
  _check_boxes("boxes2", boxes2)
  area1 = box_area(boxes1)[..., :, None]
  area2 = box_area(boxes2)[..., None, :]
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  return inter / (area1 + area2 - inter)


def _centers_sizes(boxes: Array) -> tuple[Array, Array, Array, Array]:
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def _coder_inputs(name: str, x: ArrayLike, anchors: ArrayLike, weights: Sequence[float]):
  """Checked float32 (..., 4) x, the anchors' (cx, cy, w, h) and the four weights as floats."""
  x = jnp.asarray(x, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  _check_boxes(name, x)
  _check_boxes("anchors", anchors)
  if len(weights) != 4:
    raise ValueError(f"weights must have 4 entries, got {weights}")
  return x, _centers_sizes(anchors), tuple(float(w) for w in weights)


def encode_boxes(
  targets: ArrayLike, anchors: ArrayLike, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> Array:
  """Regression deltas that take `anchors` to `targets` (torchvision BoxCoder.encode_single).

  Args:
    targets: (..., 4) xyxy ground-truth boxes.
    anchors: (..., 4) xyxy reference boxes (anchors or proposals); broadcasts with targets.
    weights: (wx, wy, ww, wh), e.g. (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head.

  Returns:
    (..., 4) float32 deltas (dx, dy, dw, dh).
  """
  targets, (ax, ay, aw, ah), (wx, wy, ww, wh) = _coder_inputs("targets", targets, anchors, weights)
  tx, ty, tw, th = _centers_sizes(targets)
  return jnp.stack(
    [
      wx * (tx - ax) / aw,
      wy * (ty - ay) / ah,
      ww * jnp.log(tw / aw),
      wh * jnp.log(th / ah),
    ],
    axis=-1,
  )


def decode_boxes(
  deltas: ArrayLike,
  anchors: ArrayLike,
  weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
  scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> Array:
  """Apply deltas to anchors (torchvision BoxCoder.decode_single with bbox_xform_clip=scale_clamp).

  Args:
    deltas: (..., 4) (dx, dy, dw, dh) as produced by encode_boxes.
    anchors: (..., 4) xyxy reference boxes; broadcasts with deltas.
    weights: (wx, wy, ww, wh).
    scale_clamp: upper clamp of dw / ww and dh / wh before exp (log(1000/16) by default).

  Returns:
    (..., 4) float32 xyxy boxes.
  """
  deltas, (ax, ay, aw, ah), (wx, wy, ww, wh) = _coder_inputs("deltas", deltas, anchors, weights)
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
  dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
  cx = dx * aw + ax
  cy = dy * ah + ay
  half_w = 0.5 * jnp.exp(dw) * aw
  half_h = 0.5 * jnp.exp(dh) * ah
  return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


def clip_boxes(boxes: ArrayLike, image_hw: ArrayLike) -> Array:
  """Clip xyxy boxes to [0, w] x [0, h].

  Args:
    boxes: (..., 4) xyxy.
    image_hw: [h, w] as a (2,) array or tuple, or (..., 2) broadcasting with boxes[..., :2].

  Returns:
    (..., 4) float32 clipped boxes.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  _check_boxes("boxes", boxes)
  image_hw = jnp.asarray(image_hw, jnp.float32)
  if image_hw.ndim < 1 or image_hw.shape[-1] != 2:
    raise ValueError(f"image_hw must have shape (..., 2), got {image_hw.shape}")
  h = image_hw[..., 0:1]
  w = image_hw[..., 1:2]
  x = jnp.clip(boxes[..., 0::2], 0.0, w)
  y = jnp.clip(boxes[..., 1::2], 0.0, h)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)
