"""Keypoint heatmaps: training targets (one-hot positions) and decoding to image coordinates.

Conventions (Detectron2's structures/keypoints.py, Heckbert 1990): a continuous coordinate c
falls in discrete cell d = floor(c) and a cell d stands for the point d + 0.5. Keypoints are
[x, y, v] in input pixels, v: 0 unlabeled, 1 labeled but not visible, 2 visible.

heatmaps_to_keypoints resizes each ROI's S x S heatmap to its box size (ceil h, ceil w) with
PyTorch's bicubic interpolation (align_corners=False, A = -0.75) and takes the argmax, as
Detectron2 and torchvision do. The box sizes differ per ROI, so here the resized map is evaluated
on a static grid of `cap` x `cap` output pixels through separable interpolation matrices:
  - a box side of at most `cap` pixels fits the grid: the result is exact (every output pixel);
  - a longer side (n > cap) takes two steps: the map at every s-th output pixel
    (s = ceil(n / cap)) locates the best sample, then the exact output pixels of a cap x cap
    window centred on it give the argmax. That equals the full-resolution argmax whenever the
    maximum lies within cap / 2 pixels of the best sample (a single dominant peak, the usual
    heatmap); it needs s <= cap / 2, i.e. sides up to cap^2 / 2 pixels.
"""

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def keypoints_to_heatmap(keypoints: Array, rois: Array, size: int) -> tuple[Array, Array]:
  """Detectron2's _keypoints_to_heatmap: the target cell of each keypoint in its ROI's heatmap.

  A keypoint maps to cell floor((x - x1) * size / (x2 - x1)) per axis (float32, in that order);
  one exactly on the right (bottom) edge maps to the last cell; outside [0, size) it is invalid,
  as is one with v == 0.

  Args:
    keypoints: (N, K, 3) [x, y, v] in input pixels; rois: (N, 4) xyxy.
  Returns:
    index (N, K) int32 in [0, size * size) (y * size + x; 0 where invalid), valid (N, K) bool.
  """
  keypoints = keypoints.astype(jnp.float32)
  rois = rois.astype(jnp.float32)
  x1, y1, x2, y2 = (rois[:, i, None] for i in range(4))
  scale_x = size / (x2 - x1)
  scale_y = size / (y2 - y1)
  x, y, v = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
  fx = jnp.floor((x - x1) * scale_x)
  fy = jnp.floor((y - y1) * scale_y)
  fx = jnp.where(x == x2, size - 1, fx)
  fy = jnp.where(y == y2, size - 1, fy)
  # NaN / inf (a degenerate ROI) fail these comparisons: invalid.
  valid = (fx >= 0) & (fy >= 0) & (fx < size) & (fy < size) & (v > 0)
  index = jnp.where(valid, fy * size + fx, 0).astype(jnp.int32)
  return index, valid


def has_visible_keypoint_in_box(keypoints: Array, rois: Array) -> Array:
  """Detectron2's select_proposals_with_visible_keypoints rule: (N,) bool, True where some
  keypoint with v >= 1 lies in the ROI, edges included. keypoints (N, K, 3), rois (N, 4)."""
  x, y, v = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
  inside = (
    (x >= rois[:, 0, None])
    & (x <= rois[:, 2, None])
    & (y >= rois[:, 1, None])
    & (y <= rois[:, 3, None])
  )
  return jnp.any(inside & (v >= 1), axis=-1)


def bilinear_upsample_matrix(size: int, factor: int = 2) -> np.ndarray:
  """(size * factor, size) float32: F.interpolate(scale_factor=factor, mode="bilinear",
  align_corners=False) along one axis (source index (i + 0.5) / factor - 0.5, clamped at 0)."""
  out = size * factor
  src = np.maximum((np.arange(out, dtype=np.float64) + 0.5) / factor - 0.5, 0.0)
  low = np.floor(src).astype(np.int64)
  high = np.minimum(low + 1, size - 1)
  frac = src - low
  m = np.zeros((out, size), np.float64)
  np.add.at(m, (np.arange(out), low), 1.0 - frac)
  np.add.at(m, (np.arange(out), high), frac)
  return m.astype(np.float32)


def _cubic_coefficients(t: Array) -> tuple[Array, Array, Array, Array]:
  """PyTorch's get_cubic_upsample_coefficients: weights of taps -1, 0, 1, 2 at fraction t."""
  a = CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  return far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)


def bicubic_matrix(out_index: Array, out_size: Array, in_size: int) -> Array:
  """Rows of F.interpolate(size=out_size, mode="bicubic", align_corners=False) along one axis.

  Args:
    out_index: (..., N) float32 output pixel indices (integers); out_size: (...) float32 output
      length (the scale is in_size / out_size, as PyTorch's for a given size).
  Returns:
    (..., N, in_size) float32: output pixel j = row j . input (taps clamped to the edges).
  """
  scale = in_size / out_size
  src = scale[..., None] * (out_index + 0.5) - 0.5
  low = jnp.floor(src)
  t = jnp.clip(src - low, 0.0, 1.0)
  cols = jnp.arange(in_size, dtype=jnp.float32)
  m = 0.0
  for tap, w in zip((-1, 0, 1, 2), _cubic_coefficients(t)):
    idx = jnp.clip(low + tap, 0, in_size - 1)
    m = m + w[..., None] * (idx[..., None] == cols)
  return m


def _argmax_2d(values: Array, valid: Array) -> tuple[Array, Array, Array]:
  """Row-major first argmax over the last two axes where valid: (row, col, value)."""
  *lead, h, w = values.shape
  flat = jnp.where(valid, values, -jnp.inf).reshape(*lead, h * w)
  pos = jnp.argmax(flat, axis=-1)
  return pos // w, pos % w, jnp.take_along_axis(flat, pos[..., None], axis=-1)[..., 0]


def heatmaps_to_keypoints(maps: Array, rois: Array, cap: int) -> Array:
  """Detectron2's heatmaps_to_keypoints on a static grid (see the module docstring for `cap`).

  Each ROI's map is resized bicubically to (ceil h, ceil w), h, w = the box's height and width
  clamped to >= 1; the argmax cell (x_int, y_int) gives x = x1 + (x_int + 0.5) * w / ceil(w)
  (y likewise).
  Args:
    maps: (R, S, S, K) heatmap logits; rois: (R, 4) xyxy in input pixels; cap: static grid side.
  Returns:
    (R, K, 4) float32 [x, y, logit, score]: logit = the resized map at the argmax (torchvision's
    keypoint score); score = exp(logit - logsumexp of the S x S map) (Detectron2's
    pred_keypoints score: softmax of the resized maximum, normalised over the S x S map).
  """
  r, s, s2, k = maps.shape
  if s != s2 or rois.shape != (r, 4):
    raise ValueError(f"maps {maps.shape}, rois {rois.shape}: want (R, S, S, K), (R, 4)")
  maps = maps.astype(jnp.float32).transpose(0, 3, 1, 2)  # (R, K, S, S)
  rois = rois.astype(jnp.float32)
  widths = jnp.maximum(rois[:, 2] - rois[:, 0], 1.0)
  heights = jnp.maximum(rois[:, 3] - rois[:, 1], 1.0)
  n_x, n_y = jnp.ceil(widths), jnp.ceil(heights)
  grid = jnp.arange(cap, dtype=jnp.float32)

  # Coarse: every stride-th output pixel (stride 1 when the side fits the grid).
  stride_x = jnp.ceil(n_x / cap)[:, None]
  stride_y = jnp.ceil(n_y / cap)[:, None]
  cx, cy = stride_x * grid, stride_y * grid  # (R, cap)
  wx = bicubic_matrix(cx, n_x, s)  # (R, cap, S)
  wy = bicubic_matrix(cy, n_y, s)
  coarse = jnp.einsum("ryh,rkhw,rxw->rkyx", wy, maps, wx)
  ok = (cy < n_y[:, None])[:, None, :, None] & (cx < n_x[:, None])[:, None, None, :]
  iy, ix, _ = _argmax_2d(coarse, ok)  # (R, K)

  # Fine: every output pixel of a cap x cap window around the best coarse sample.
  start_x = jnp.clip(stride_x * ix - cap // 2, 0, jnp.maximum(n_x[:, None] - cap, 0))
  start_y = jnp.clip(stride_y * iy - cap // 2, 0, jnp.maximum(n_y[:, None] - cap, 0))
  fx = start_x[..., None] + grid  # (R, K, cap)
  fy = start_y[..., None] + grid
  wx = bicubic_matrix(fx, n_x[:, None], s)  # (R, K, cap, S)
  wy = bicubic_matrix(fy, n_y[:, None], s)
  fine = jnp.einsum("rkyh,rkhw,rkxw->rkyx", wy, maps, wx)
  ok = (fy < n_y[:, None, None])[..., :, None] & (fx < n_x[:, None, None])[..., None, :]
  jy, jx, logit = _argmax_2d(fine, ok)
  x_int = jnp.take_along_axis(fx, jx[..., None], axis=-1)[..., 0]
  y_int = jnp.take_along_axis(fy, jy[..., None], axis=-1)[..., 0]

  x = (x_int + 0.5) * (widths / n_x)[:, None] + rois[:, 0, None]
  y = (y_int + 0.5) * (heights / n_y)[:, None] + rois[:, 1, None]
  score = jnp.exp(logit - jax.nn.logsumexp(maps, axis=(2, 3)))
  return jnp.stack([x, y, logit, score], axis=-1)
