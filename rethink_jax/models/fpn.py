"""Feature Pyramid Network on a ResNet (Detectron2's FPN with LastLevelMaxPool), Flax Linen.

  build_resnet_fpn(depth=50, norm="GN", fpn_norm="GN")(x (B, H, W, 3), train, image_hw=None)
    -> {"p2": (B, H/4, W/4, 256), ..., "p5": (B, H/32, W/32, 256), "p6": (B, H/64, W/64, 256)}

With norm_stats "valid", image_hw (B, 2), each image's [h, w] inside the padding, reaches every
conv as the valid region of its level (layers.py: "Padding"), and the top-down sums are 0 outside
it: each level's valid region equals the unpadded image's level (torchvision's FPN, which
upsamples to the finer level's size).

Params: bottom_up/... (the ResNet), fpn_lateral{2..5}/{kernel, [bias], [norm]},
fpn_output{2..5}/{kernel, [bias], [norm]}. Convs have a bias only when not normed.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rethink_jax.models import config as config_lib
from rethink_jax.models import layers
from rethink_jax.models import resnet as resnet_lib
from rethink_jax.models.layers import ConvDef
from rethink_jax.models.layers import xavier_fill

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
  """FPN: lateral 1x1 + output 3x3 convs (each followed by the conv's norm), sum fusion, nearest 2x
  top-down upsampling, P6 = max-pool(kernel 1, stride 2) of P5.

  __call__(x (B, H, W, 3), train, image_hw=None) -> {"p2".."p6"} (B, ceil(H/s), ceil(W/s),
  out_channels), s = 4, 8, 16, 32, 64 (P6 only when top_block).

  Attributes:
    bottom_up: the ResNet module (its params live under "bottom_up"); see `build_resnet_fpn`.
    in_features: bottom-up outputs used, finest first; level = the digit of the name.
    out_channels: 256 in Detectron2.
    conv: the FPN's Conv2d with its norm (layers.conv_def); it has a bias only when not normed.
    top_block: add P6 (LastLevelMaxPool).
    norm_stats: "padded" or "valid" (layers.check_norm_stats; the bottom_up's is its own).
  """

  bottom_up: nn.Module
  in_features: Sequence[str]
  out_channels: int
  conv: ConvDef
  top_block: bool = True
  norm_stats: str = "padded"

  @nn.compact
  def __call__(
    self, x: Array, train: bool = False, image_hw: Optional[Array] = None
  ) -> dict[str, Array]:
    feats = self.bottom_up(x, train, image_hw)
    if self.norm_stats != "valid":
      image_hw = None
    missing = [f for f in self.in_features if f not in feats]
    if missing:
      raise ValueError(f"FPN: bottom_up gave {sorted(feats)}, missing {missing}.")
    conv = lambda k, name: self.conv(
      self.out_channels, k, padding=k // 2, kernel_init=xavier_fill, name=name
    )
    levels = [int(f[-1]) for f in self.in_features]
    outputs = {}
    prev = None
    # Top-down: coarsest level first; every lateral gets the upsampled sum from above.
    for f, lvl in reversed(list(zip(self.in_features, levels))):
      valid_hw = None if image_hw is None else layers.valid_hw_at(image_hw, 2**lvl)
      lateral = conv(1, f"fpn_lateral{lvl}")(feats[f], train, valid_hw)
      if prev is not None:
        lateral = lateral + upsample_nearest(prev, lateral.shape[1:3]).astype(lateral.dtype)
      prev = layers.zero_outside(lateral, valid_hw)
      outputs[f"p{lvl}"] = conv(3, f"fpn_output{lvl}")(prev, train, valid_hw)
    if self.top_block:
      last = max(levels)
      # LastLevelMaxPool: max_pool2d(kernel 1, stride 2, pad 0) is a stride-2 subsampling.
      outputs[f"p{last + 1}"] = outputs[f"p{last}"][:, ::2, ::2, :]
    return {k: outputs[k] for k in sorted(outputs, key=lambda k: int(k[1:]))}


def backbone_from_config(model_config: Mapping[str, Any], axis_name: Optional[str] = None) -> FPN:
  """ResNet-FPN backbone (Detectron2's build_resnet_fpn_backbone) of a model config:
  x (B, H, W, 3) -> {"p2".."p6"}. The FPN's norm shares the backbone's num_groups,
  bn_group_size and norm_stats."""
  b, dtype = model_config["backbone"], model_config["dtype"]
  bottom_up = resnet_lib.resnet_from_config(b, dtype, axis_name)
  norm = layers.build_norm(
    model_config["fpn"]["norm"],
    num_groups=b["num_groups"],
    bn_group_size=b["bn_group_size"] or None,
    axis_name=axis_name,
  )
  norm_stats = b.get("norm_stats", "padded")
  layers.check_norm_stats(norm_stats, model_config["fpn"]["norm"])
  return FPN(
    bottom_up=bottom_up,
    in_features=resnet_lib.STAGES,
    out_channels=model_config["fpn"]["out_channels"],
    conv=layers.conv_def(norm=norm, dtype=dtype),
    norm_stats=norm_stats,
  )


def build_resnet_fpn(
  *,
  fpn_norm: Optional[str] = None,
  out_channels: Optional[int] = None,
  dtype: Any = None,
  axis_name: Optional[str] = None,
  **backbone: Any,
) -> FPN:
  """ResNet-FPN from plain values: default_model_config() with these fields overridden.

    build_resnet_fpn(depth=50, norm="GN", fpn_norm="GN")
  backbone: fields of the config's backbone section; fpn_norm, out_channels: of its fpn section
  (None = the config's); dtype: None = the config's.
  """
  c = config_lib.default_model_config().to_dict()
  unknown = sorted(set(backbone) - set(c["backbone"]))
  if unknown:
    raise ValueError(f"build_resnet_fpn: unknown fields {unknown}; known: {sorted(c['backbone'])}")
  c["backbone"].update(backbone)
  if fpn_norm is not None:
    c["fpn"]["norm"] = fpn_norm
  if out_channels is not None:
    c["fpn"]["out_channels"] = out_channels
  if dtype is not None:
    c["dtype"] = dtype
  return backbone_from_config(c, axis_name)
