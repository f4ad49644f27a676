"""RoIAlign (torchvision.ops.roi_align semantics) on NHWC features, static shapes.

Formulation. Bilinear sampling is separable: a sample at (y, x) reads rows {y_lo, y_hi} and
columns {x_lo, x_hi} with weights (1 - ly, ly) x (1 - lx, lx), and torchvision's rules (samples
outside [-1, H] x [-1, W] read 0, coordinates below 0 clamp to 0, the last row / column clamps)
act on y and x independently. So for every ROI we build, per output row p, the 2 * G (row index,
weight) taps of its G sample rows, and likewise per output column q, and the value of bin (p, q)
is the sum over the K = (2G)^2 products of taps of one row of C channels from the flattened
(H * W, C) map: xla_cpu.weighted_rows, written as K row gathers added up (never an
(R, oh, ow, K, C) array), whose backward scatter-adds the taps (torchvision's backward). Shapes
never depend on the data: the work is R * oh * ow * K * C.

sampling_ratio = 0 (Detectron2's ROIAlignV2 "adaptive": ceil(roi_size / bins) samples per bin,
per axis, per ROI) uses the static cap G = max_sampling_ratio: each ROI samples on its own
ceil(roi_size / bins) grid, with the unused of the G slots masked out, which is exact whenever
ceil(roi_size / bins) <= G. Beyond the cap a ROI uses G evenly spaced samples per bin and axis
(what sampling_ratio = G would compute for that ROI): a coarser average of the same bin than
Detectron2's. Inside multilevel_roi_align a box is pooled on the level where sqrt(area) measures
14-28 cells (P2 and P5 clamp: smaller boxes on P2, larger on P5), so with 7 x 7 bins the cap 4 is
reached by boxes whose longer side exceeds 28 cells on their level: square boxes above 896 px (on
P5), and elongated ones sooner (a 2:1 box once sqrt(area) passes 20 cells); 14 x 14 bins: twice
those sizes. The cost grows with G^2 (K = 64 taps per bin at G = 4, 16 at sampling_ratio = 2).

Boxes get no gradient (torchvision's roi_align has none for the ROIs either).
"""

from collections.abc import Mapping, Sequence
from typing import Union

import jax
import jax.numpy as jnp

from rethink_jax.ops import xla_cpu

Array = jax.Array
OutputSize = Union[int, Sequence[int]]

# Level assignment: Detectron2 floor(l0 + log2(s / s0 + 1e-8)), torchvision's LevelMapper
# floor(l0 + log2(s / s0) + 1e-6); they differ for sizes just below s0 * 2^k.
LEVEL_RULES = ("detectron2", "torchvision")
_EPS_LEVEL = {"detectron2": 1e-8, "torchvision": 1e-6}


def _axis_taps(
  start: Array, bin_size: Array, grid: Array, size: Union[int, Array], num_bins: int, max_grid: int
) -> tuple[Array, Array]:
  """Bilinear taps along one axis for every ROI and output bin.

  Args:
    start: (R,) ROI start in feature coordinates (after the aligned offset).
    bin_size: (R,) bin length.
    grid: (R,) int, samples per bin for each ROI (<= 0 means none).
    size: () or (R,) feature length along this axis (H or W).
    num_bins: static output length.
    max_grid: static number of sample slots G.

  Returns:
    index (R, num_bins, 2G) int32 in [0, size), weight (R, num_bins, 2G) float32, the weights
    including the 1 / grid averaging and zero for inactive or out-of-range samples.
  """
  size = jnp.broadcast_to(jnp.asarray(size), start.shape)
  sizef = size.astype(jnp.float32)[:, None, None]
  grid_eff = jnp.clip(grid, 1, max_grid).astype(jnp.float32)[:, None, None]
  p = jnp.arange(num_bins, dtype=jnp.float32)[None, :, None]
  i = jnp.arange(max_grid, dtype=jnp.float32)[None, None, :]
  b = bin_size[:, None, None]
  pos = start[:, None, None] + p * b + (i + 0.5) * b / grid_eff  # (R, P, G)
  active = (i < grid[:, None, None].astype(jnp.float32)) & (pos >= -1.0) & (pos <= sizef)
  pos = jnp.maximum(pos, 0.0)
  low = jnp.floor(pos)
  at_end = low >= sizef - 1.0
  low = jnp.where(at_end, sizef - 1.0, low)
  frac = jnp.where(at_end, 0.0, pos - low)
  high = jnp.where(at_end, low, low + 1.0)
  scale = jnp.where(active, 1.0 / grid_eff, 0.0)
  index = jnp.stack([low, high], axis=-1).astype(jnp.int32)
  weight = jnp.stack([(1.0 - frac) * scale, frac * scale], axis=-1)
  shape = index.shape[:2] + (2 * max_grid,)
  return index.reshape(shape), weight.reshape(shape)


def _pool_flat(
  flat: Array,
  boxes: Array,
  heights: Array,
  widths: Array,
  offsets: Array,
  scales: Array,
  output_size: tuple[int, int],
  sampling_ratio: int,
  aligned: bool,
  max_sampling_ratio: int,
) -> Array:
  """RoIAlign of one image from a flattened map (or several concatenated maps).

  Args:
    flat: (S, C) rows of the flattened map(s).
    boxes: (R, 4) xyxy in input pixels.
    heights, widths, offsets: (R,) int32 height / width / first row in `flat` of each ROI's map.
    scales: (R,) float32 spatial scale of each ROI's map.

  Returns:
    (R, oh, ow, C) in flat's dtype.
  """
  oh, ow = output_size
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  shift = 0.5 if aligned else 0.0
  x1 = boxes[:, 0] * scales - shift
  y1 = boxes[:, 1] * scales - shift
  roi_w = boxes[:, 2] * scales - shift - x1
  roi_h = boxes[:, 3] * scales - shift - y1
  if not aligned:
    roi_w = jnp.maximum(roi_w, 1.0)
    roi_h = jnp.maximum(roi_h, 1.0)
  bin_h, bin_w = roi_h / oh, roi_w / ow
  if sampling_ratio > 0:
    g = int(sampling_ratio)
    grid_h = jnp.full(roi_h.shape, g, jnp.int32)
    grid_w = grid_h
  else:
    g = int(max_sampling_ratio)
    grid_h = jnp.ceil(bin_h).astype(jnp.int32)
    grid_w = jnp.ceil(bin_w).astype(jnp.int32)
  iy, wy = _axis_taps(y1, bin_h, grid_h, heights, oh, g)
  ix, wx = _axis_taps(x1, bin_w, grid_w, widths, ow, g)
  r = boxes.shape[0]
  rows = offsets[:, None, None] + iy * widths[:, None, None]  # (R, oh, 2G)
  index = rows[:, :, None, :, None] + ix[:, None, :, None, :]  # (R, oh, ow, 2G, 2G)
  weight = wy[:, :, None, :, None] * wx[:, None, :, None, :]
  k = (2 * g) ** 2
  index = index.reshape(r, oh, ow, k)
  weight = weight.reshape(r, oh, ow, k, 1)
  return xla_cpu.weighted_rows(flat, index, weight)


def _check_output_size(output_size: OutputSize) -> tuple[int, int]:
  if isinstance(output_size, int):
    output_size = (output_size, output_size)
  output_size = tuple(int(s) for s in output_size)
  if len(output_size) != 2 or min(output_size) < 1:
    raise ValueError(f"output_size must be an int or (h, w), got {output_size}")
  return output_size


def roi_align(
  features: Array,
  boxes: Array,
  output_size: OutputSize,
  spatial_scale: float,
  sampling_ratio: int,
  aligned: bool,
  max_sampling_ratio: int = 4,
) -> Array:
  """RoIAlign, equal to torchvision.ops.roi_align (NCHW there, NHWC here).

  Args:
    features: (B, H, W, C).
    boxes: (B, R, 4) xyxy in input pixels (feature coordinates = boxes * spatial_scale).
    output_size: int or (oh, ow).
    spatial_scale: float, e.g. 1 / stride.
    sampling_ratio: static int; > 0 samples per bin and axis, 0 adaptive (see module doc).
    aligned: static bool; True shifts by -0.5 pixel (Detectron2's ROIAlignV2).
    max_sampling_ratio: static cap for sampling_ratio = 0.

  Returns:
    (B, R, oh, ow, C) in features' dtype.
  """
  if (
    features.ndim != 4
    or boxes.ndim != 3
    or boxes.shape[-1] != 4
    or boxes.shape[0] != features.shape[0]
  ):
    raise ValueError(
      f"roi_align needs features (B, H, W, C) and boxes (B, R, 4), got "
      f"{features.shape} and {boxes.shape}"
    )
  output_size = _check_output_size(output_size)
  b, h, w, c = features.shape
  r = boxes.shape[1]
  flat = features.reshape(b, h * w, c)
  const = lambda v, dt: jnp.full((r,), v, dt)
  fn = lambda f, bx: _pool_flat(
    f,
    bx,
    const(h, jnp.int32),
    const(w, jnp.int32),
    const(0, jnp.int32),
    const(spatial_scale, jnp.float32),
    output_size,
    sampling_ratio,
    aligned,
    max_sampling_ratio,
  )
  return jax.vmap(fn)(flat, boxes)


def assign_levels(
  boxes: Array,
  min_level: int,
  max_level: int,
  canonical_box_size: float = 224,
  canonical_level: int = 4,
  level_rule: str = "detectron2",
) -> Array:
  """Detectron2's assign_boxes_to_levels: (..., 4) boxes -> (...,) int32 level in [min, max].

  level_rule: "detectron2" or "torchvision" (where the epsilon goes, see LEVEL_RULES).
  """
  if level_rule not in LEVEL_RULES:
    raise ValueError(f"level_rule must be one of {LEVEL_RULES}, got {level_rule!r}")
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  size = jnp.sqrt(w * h)
  eps = _EPS_LEVEL[level_rule]
  if level_rule == "torchvision":
    level = jnp.floor(canonical_level + jnp.log2(size / canonical_box_size) + eps)
  else:
    level = jnp.floor(canonical_level + jnp.log2(size / canonical_box_size + eps))
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def multilevel_roi_align(
  features: Mapping[str, Array],
  boxes: Array,
  output_size: OutputSize,
  sampling_ratio: int,
  aligned: bool,
  canonical_box_size: float = 224,
  canonical_level: int = 4,
  max_sampling_ratio: int = 4,
  level_rule: str = "detectron2",
) -> Array:
  """RoIAlign of each box on its FPN level (Detectron2's ROIPooler).

  The levels are flattened into one (sum_l H_l * W_l, C) array per image and each ROI's taps point
  into its own level's rows, so each ROI costs the same as a single-level RoIAlign (no work on
  the other levels).

  Args:
    features: {"p2": (B, H2, W2, C), ..., "p5": ...}; key "pk" has stride 2 ** k.
    boxes: (B, R, 4) xyxy in input pixels.
    output_size, sampling_ratio, aligned, max_sampling_ratio: as in roi_align.
    canonical_box_size, canonical_level: level = floor(canonical_level + log2(sqrt(area) /
      canonical_box_size + 1e-8)) clamped to the levels given.
    level_rule: "torchvision" moves the epsilon out of the log (assign_levels).

  Returns:
    (B, R, oh, ow, C) in the features' dtype.
  """
  if not features:
    raise ValueError("multilevel_roi_align needs at least one level")
  keys = sorted(features, key=lambda k: int(k[1:]))
  levels = [int(k[1:]) for k in keys]
  if levels != list(range(levels[0], levels[-1] + 1)):
    raise ValueError(f"levels must be consecutive, got {keys}")
  feats = [features[k] for k in keys]
  b, c = feats[0].shape[0], feats[0].shape[-1]
  for k, f in zip(keys, feats):
    if f.ndim != 4 or f.shape[0] != b or f.shape[-1] != c:
      raise ValueError(f"features[{k!r}] must be (B={b}, H, W, C={c}), got {f.shape}")
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != b:
    raise ValueError(f"boxes must be (B={b}, R, 4), got {boxes.shape}")
  output_size = _check_output_size(output_size)
  hs = [f.shape[1] for f in feats]
  ws = [f.shape[2] for f in feats]
  offs, total = [], 0
  for h, w in zip(hs, ws):
    offs.append(total)
    total += h * w
  flat = jnp.concatenate([f.reshape(b, -1, c) for f in feats], axis=1)
  tables = [
    jnp.asarray(t, dt)
    for t, dt in (
      (hs, jnp.int32),
      (ws, jnp.int32),
      (offs, jnp.int32),
      ([2.0**-l for l in levels], jnp.float32),
    )
  ]

  def one_image(f, bx):
    lvl = (
      assign_levels(
        jax.lax.stop_gradient(bx),
        levels[0],
        levels[-1],
        canonical_box_size,
        canonical_level,
        level_rule,
      )
      - levels[0]
    )
    h, w, off, scale = (t[lvl] for t in tables)
    return _pool_flat(
      f, bx, h, w, off, scale, output_size, sampling_ratio, aligned, max_sampling_ratio
    )

  return jax.vmap(one_image)(flat, boxes)
