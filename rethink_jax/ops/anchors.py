"""Anchor generation with Detectron2's DefaultAnchorGenerator semantics (torchvision's as options).

Anchors depend only on static shapes, so they are computed with NumPy (float64, cast to float32
at the end) and returned as constants; they never cost anything inside jit.

torchvision's AnchorGenerator differs in two ways, both options here: its cell anchors are rounded
to integers (`round_cell`), and its stride of a level is padded image size // feature size per
axis (`grid_strides`), which is not 64 on P6 when P5 has an odd size.
"""

from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

PerLevel = Union[Sequence[float], Sequence[Sequence[float]]]


def _per_level(param: PerLevel, num_levels: int, name: str) -> list[list[float]]:
  """Detectron2's broadcasting: a flat list applies to every level, a list of lists is per level."""
  param = list(param)
  if param and not isinstance(param[0], (list, tuple)):
    return [list(param)] * num_levels
  if len(param) == 1:
    return [list(param[0])] * num_levels
  if len(param) != num_levels:
    raise ValueError(f"{name} has {len(param)} levels, expected {num_levels}")
  return [list(p) for p in param]


def cell_anchors(
  sizes: Sequence[float], aspect_ratios: Sequence[float], round_cell: bool = False
) -> np.ndarray:
  """Anchors centred at (0, 0): (len(sizes) * len(aspect_ratios), 4) float64.

  Ordered size-major, then aspect ratio (ratio = h / w), area = size ** 2. round_cell: round the
  corners to integers, half to even (torchvision's AnchorGenerator); Detectron2 does not round.
  """
  out = []
  for size in sizes:
    area = float(size) ** 2
    for ratio in aspect_ratios:
      w = np.sqrt(area / ratio)
      h = ratio * w
      out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
  out = np.asarray(out, np.float64).reshape(-1, 4)
  return np.round(out) if round_cell else out


def generate_anchors(
  feature_hw: Sequence[tuple[int, int]],
  strides: Sequence[Union[int, tuple[int, int]]],
  sizes: PerLevel,
  aspect_ratios: PerLevel,
  offset: float = 0.0,
  round_cell: bool = False,
) -> list[jax.Array]:
  """Anchors for every feature level.

  Args:
    feature_hw: list of (h, w) per level (static ints).
    strides: list of strides per level: an int, or (stride_y, stride_x).
    sizes: per-level list of sizes, e.g. ((32,), (64,), (128,), (256,), (512,)), or one flat list
      used for all levels.
    aspect_ratios: (0.5, 1.0, 2.0) for all levels, or a per-level list of lists.
    offset: anchor centre of cell (x, y) is ((x + offset) * stride, (y + offset) * stride).
    round_cell: round the cell anchors to integers (see `cell_anchors`).

  Returns:
    list over levels of (h * w * A, 4) float32 xyxy arrays, A = len(sizes_l) * len(ratios_l),
    ordered location-major (row, then column), then size, then aspect ratio.
  """
  num_levels = len(feature_hw)
  if len(strides) != num_levels:
    raise ValueError(f"got {num_levels} feature shapes {feature_hw} but strides {strides}")
  if not 0.0 <= offset < 1.0:
    raise ValueError(f"offset must be in [0, 1), got {offset}")
  sizes = _per_level(sizes, num_levels, "sizes")
  aspect_ratios = _per_level(aspect_ratios, num_levels, "aspect_ratios")
  out = []
  for (h, w), stride, sz, ar in zip(feature_hw, strides, sizes, aspect_ratios):
    base = cell_anchors(sz, ar, round_cell)
    stride_y, stride_x = (stride, stride) if np.isscalar(stride) else stride
    xs = (np.arange(int(w), dtype=np.float64) + offset) * stride_x
    ys = (np.arange(int(h), dtype=np.float64) + offset) * stride_y
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    shifts = np.stack([xx.ravel(), yy.ravel(), xx.ravel(), yy.ravel()], axis=1)
    anchors = (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)
    out.append(jnp.asarray(anchors.astype(np.float32)))
  return out


def grid_strides(image_hw: tuple[int, int], feature_hw: Sequence[tuple[int, int]]) -> list:
  """torchvision's strides: (image h // feature h, image w // feature w) per level, where the
  image is the padded input tensor."""
  return [(int(image_hw[0]) // int(h), int(image_hw[1]) // int(w)) for h, w in feature_hw]
