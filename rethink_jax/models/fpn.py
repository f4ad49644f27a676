"""Feature Pyramid Network on a ResNet (Detectron2's FPN with LastLevelMaxPool), Flax Linen.

  FPN(bottom_up=ResNet(...), out_channels=256, norm="GN")(x (B, H, W, 3), train)
    -> {"p2": (B, H/4, W/4, 256), ..., "p5": (B, H/32, W/32, 256), "p6": (B, H/64, W/64, 256)}

Params: bottom_up/... (the ResNet), fpn_lateral{2..5}/{kernel, [bias], [norm]},
fpn_output{2..5}/{kernel, [bias], [norm]}. Convs have a bias only when not normed.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rethink_jax.models.layers import Conv2d, xavier_fill
from rethink_jax.models.resnet import ResNet

Array = jax.Array


def upsample_nearest(x: Array, hw: tuple[int, int]) -> Array:
  """Nearest upsampling of x (B, h, w, C) to (B, H, W, C): a 2x repeat when H, W = 2h, 2w;
  otherwise PyTorch's nearest rule (source index floor(i * h / H))."""
  b, h, w, c = x.shape
  H, W = hw
  if (H, W) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  iy = (jnp.arange(H) * h) // H
  ix = (jnp.arange(W) * w) // W
  return x[:, iy][:, :, ix]


class FPN(nn.Module):
  """FPN: lateral 1x1 + output 3x3 convs (each followed by `norm`), sum fusion, nearest 2x
  top-down upsampling, P6 = max-pool(kernel 1, stride 2) of P5.

  __call__(x (B, H, W, 3), train) -> {"p2".."p6"} (B, ceil(H/s), ceil(W/s), out_channels),
  s = 4, 8, 16, 32, 64 (P6 only when top_block).

  Attributes:
    bottom_up: the ResNet module (its params live under "bottom_up"); see `build_resnet_fpn`.
    in_features: bottom-up outputs used, finest first; level = the digit of the name.
    out_channels: 256.
    norm: "GN", "SyncBN", "BN", "FrozenBN" or None/"" (then the convs have a bias).
    dtype: conv computation dtype (params and norm statistics stay float32).
  """
  bottom_up: nn.Module
  in_features: Sequence[str] = ("res2", "res3", "res4", "res5")
  out_channels: int = 256
  norm: Optional[str] = "GN"
  num_groups: int = 32
  bn_group_size: Optional[int] = None
  axis_name: Optional[str] = None
  top_block: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    feats = self.bottom_up(x, train)
    missing = [f for f in self.in_features if f not in feats]
    if missing:
      raise ValueError(f"FPN: bottom_up gave {sorted(feats)}, missing {missing}.")
    conv = lambda k, name: Conv2d(
        self.out_channels, k, padding=k // 2, norm=self.norm, num_groups=self.num_groups,
        bn_group_size=self.bn_group_size, axis_name=self.axis_name, kernel_init=xavier_fill,
        dtype=jnp.dtype(self.dtype), name=name)
    levels = [int(f[-1]) for f in self.in_features]
    outputs = {}
    prev = None
    # Top-down: coarsest level first; every lateral gets the upsampled sum from above.
    for f, lvl in reversed(list(zip(self.in_features, levels))):
      lateral = conv(1, f"fpn_lateral{lvl}")(feats[f], train)
      if prev is not None:
        lateral = lateral + upsample_nearest(prev, lateral.shape[1:3]).astype(lateral.dtype)
      prev = lateral
      outputs[f"p{lvl}"] = conv(3, f"fpn_output{lvl}")(prev, train)
    if self.top_block:
      last = max(levels)
      # LastLevelMaxPool: max_pool2d(kernel 1, stride 2, pad 0) is a stride-2 subsampling.
      outputs[f"p{last + 1}"] = outputs[f"p{last}"][:, ::2, ::2, :]
    return {k: outputs[k] for k in sorted(outputs, key=lambda k: int(k[1:]))}


def build_resnet_fpn(depth: int = 50, norm: Optional[str] = "GN", fpn_norm: Optional[str] = "GN",
                     stride_in_1x1: bool = False, freeze_at: int = 0, num_groups: int = 32,
                     width: int = 64, bn_group_size: Optional[int] = None,
                     out_channels: int = 256, axis_name: Optional[str] = None,
                     dtype: Any = jnp.float32) -> FPN:
  """ResNet-FPN backbone (Detectron2's build_resnet_fpn_backbone): x (B,H,W,3) -> {"p2".."p6"}."""
  bottom_up = ResNet(depth=depth, norm=norm, stride_in_1x1=stride_in_1x1, freeze_at=freeze_at,
                     num_groups=num_groups, width=width, bn_group_size=bn_group_size,
                     axis_name=axis_name, dtype=dtype)
  return FPN(bottom_up=bottom_up, out_channels=out_channels, norm=fpn_norm,
             num_groups=num_groups, bn_group_size=bn_group_size, axis_name=axis_name, dtype=dtype)
