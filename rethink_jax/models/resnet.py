"""ResNet and ResNeXt backbones (Detectron2's ResNet: BasicStem + res2..res5), Flax Linen.

  build_resnet(depth=50, norm="GN")(x (B, H, W, 3), train)
    -> {"res2": (B, H/4, W/4, 256), ..., "res5": (B, H/32, W/32, 2048)}
  build_resnet(depth=101, groups=32, width_per_group=8)   # X-101-32x8d: grouped 3x3 convs

ResNet receives its convs built (`conv`, `frozen_conv`: Conv2d factories with their norm and
dtype bound); `resnet_from_config` / `build_resnet` build them from the config. With norm_stats
"valid", every module passes its input's valid [h, w] to its convs (layers.py: "Padding").

Parameter tree (mirrors Detectron2's backbone.bottom_up.*, so weights move by renaming):
  stem/conv1/{kernel, norm/{scale, bias}}
  res2/0/{conv1, conv2, conv3, shortcut}/{kernel, norm/...}, res2/1/..., ..., res5/2/...
BasicBlock (depth 18/34) blocks have conv1, conv2 and (when channels change) shortcut.
ResNeXt has the same tree; its conv2 kernels are (3, 3, bottleneck / groups, bottleneck).
FrozenBN keeps its scale/bias in the collection "frozen" at the same paths.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax

from rethink_jax.models import config as config_lib
from rethink_jax.models import layers
from rethink_jax.models.layers import Activation
from rethink_jax.models.layers import ConvDef
from rethink_jax.ops.xla_cpu import max_pool

Array = jax.Array

# depth -> (blocks per stage res2..res5, bottleneck?)
STAGE_BLOCKS = {
  18: ((2, 2, 2, 2), False),
  34: ((3, 4, 6, 3), False),
  50: ((3, 4, 6, 3), True),
  101: ((3, 4, 23, 3), True),
  152: ((3, 8, 36, 3), True),
}
STAGES = ("res2", "res3", "res4", "res5")
_BN_LIKE = ("BN", "SyncBN", "FrozenBN")


def frozen_norm(norm: Optional[str]) -> Optional[str]:
  """The norm of a frozen stage: BN variants become FrozenBN (Detectron2's `freeze()`); GN stays
  GN (it has no statistics to freeze) but its parameters are masked and get no gradient."""
  return "FrozenBN" if norm in _BN_LIKE else norm


def frozen_param_prefixes(
  freeze_at: int, prefix: Sequence[str] = ()
) -> tuple[tuple[str, ...], ...]:
  """Param-tree path prefixes the optimizer must not update for `freeze_at`.

  freeze_at=0: none; 1: stem; k >= 2: stem and res2..res{k}. `prefix` is where the ResNet's
  params sit in the full tree, e.g. ("backbone", "bottom_up").
  """
  if not 0 <= freeze_at <= 5:
    raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}.")
  names = (["stem"] if freeze_at >= 1 else []) + [f"res{k}" for k in range(2, freeze_at + 1)]
  return tuple(tuple(prefix) + (n,) for n in names)


def trainable_mask(params: Any, prefixes: Sequence[Sequence[str]]) -> Any:
  """A pytree of bools like `params`: False under any of `prefixes` (for optax.masked)."""
  prefixes = [tuple(p) for p in prefixes]

  def keep(path, _):
    keys = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
    return not any(keys[: len(p)] == p for p in prefixes)

  return jax.tree_util.tree_map_with_path(keep, params)


class BasicStem(nn.Module):
  """conv1 7x7/2 (pad 3) + norm + ReLU + max-pool 3x3/2 (pad 1): (B,H,W,3) -> (B,H/4,W/4,C)."""

  features: int
  conv: ConvDef
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: Array, train: bool = False, valid_hw: Optional[Array] = None) -> Array:
    conv1 = self.conv(self.features, 7, strides=2, padding=3, name="conv1")
    # Post-ReLU values are >= 0, so zeros outside a valid region never win the max inside it;
    # outside it the pool would copy valid values, which an unpadded image does not have.
    y = max_pool(self.activation(conv1(x, train, valid_hw)), 3, 2, 1)
    return layers.zero_outside(y, None if valid_hw is None else layers.valid_hw_at(valid_hw, 4))


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (in `groups` groups: ResNeXt) -> 1x1 (+ projection shortcut when channels change).

  (B, H, W, Cin) -> (B, H/s, W/s, out_channels).
  """

  out_channels: int
  bottleneck_channels: int
  stride: int
  stride_in_1x1: bool
  conv: ConvDef
  activation: Activation = nn.relu
  groups: int = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False, valid_hw: Optional[Array] = None) -> Array:
    conv = lambda f, k, s, name, g=1: self.conv(
      f, k, strides=s, padding=k // 2, groups=g, name=name
    )
    act = self.activation
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    mid_hw = out_hw = valid_hw
    if valid_hw is not None:
      mid_hw = layers.valid_hw_at(valid_hw, s1)
      out_hw = layers.valid_hw_at(valid_hw, self.stride)
    shortcut = x
    if x.shape[-1] != self.out_channels:  # projection when the channels change
      shortcut = conv(self.out_channels, 1, self.stride, "shortcut")(x, train, valid_hw)
    y = act(conv(self.bottleneck_channels, 1, s1, "conv1")(x, train, valid_hw))
    y = act(conv(self.bottleneck_channels, 3, s3, "conv2", self.groups)(y, train, mid_hw))
    y = conv(self.out_channels, 1, 1, "conv3")(y, train, out_hw)
    return act(y + shortcut)


class BasicBlock(nn.Module):
  """3x3 -> 3x3 (+ projection shortcut when channels change): (B,H,W,Cin) -> (B,H/s,W/s,C)."""

  out_channels: int
  stride: int
  conv: ConvDef
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: Array, train: bool = False, valid_hw: Optional[Array] = None) -> Array:
    conv = lambda k, s, name: self.conv(self.out_channels, k, strides=s, padding=k // 2, name=name)
    act = self.activation
    out_hw = None if valid_hw is None else layers.valid_hw_at(valid_hw, self.stride)
    shortcut = x
    if x.shape[-1] != self.out_channels:
      shortcut = conv(1, self.stride, "shortcut")(x, train, valid_hw)
    y = act(conv(3, self.stride, "conv1")(x, train, valid_hw))
    y = conv(3, 1, "conv2")(y, train, out_hw)
    return act(y + shortcut)


class ResStage(nn.Module):
  """A stage res{k}: blocks named "0", "1", ...; the first one carries the stride."""

  num_blocks: int
  out_channels: int
  bottleneck_channels: int
  stride: int
  bottleneck: bool
  stride_in_1x1: bool
  conv: ConvDef
  activation: Activation = nn.relu
  groups: int = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False, valid_hw: Optional[Array] = None) -> Array:
    for i in range(self.num_blocks):
      s = self.stride if i == 0 else 1
      if i == 1 and valid_hw is not None:
        valid_hw = layers.valid_hw_at(valid_hw, self.stride)
      if self.bottleneck:
        x = BottleneckBlock(
          self.out_channels,
          self.bottleneck_channels,
          s,
          self.stride_in_1x1,
          self.conv,
          self.activation,
          self.groups,
          name=str(i),
        )(x, train, valid_hw)
      else:
        block = BasicBlock(self.out_channels, s, self.conv, self.activation, name=str(i))
        x = block(x, train, valid_hw)
    return x


class ResNet(nn.Module):
  """Detectron2's ResNet (stem + res2..res5); build it with `build_resnet` or `resnet_from_config`.

  __call__(x (B, H, W, 3), train, image_hw=None) -> {"res2".."res5"} at strides 4, 8, 16, 32
  with 4w, 8w, 16w, 32w channels (bottleneck, w = width) or w, 2w, 4w, 8w (depth 18/34).
  X-101-32x8d is depth=101, groups=32, width_per_group=8 (its res2 bottleneck: 256 channels).
  image_hw (B, 2): each image's [h, w] inside the padding; used with norm_stats "valid" only.

  Attributes:
    depth: 18, 34, 50, 101 or 152.
    width: channels of the stem (64 = standard; tiny models use 8 or 16).
    stride_in_1x1: True puts a stage's stride in the first 1x1 conv (MSRA / Caffe2 weights), False
      in the 3x3 conv (torchvision, timm, FAIR GN weights).
    norm_stats: "padded" (statistics over the padded tensor) or "valid" (over image_hw; GN only).
    freeze_at: 0 trains everything; 1 freezes the stem; k >= 2 the stem and res2..res{k}. Frozen
      outputs pass through stop_gradient and `frozen_param_prefixes(freeze_at)` lists the params
      the optimizer must mask.
    conv: the normed, bias-free Conv2d of the trained stages (layers.conv_def).
    frozen_conv: the Conv2d of the frozen stages (BN norms become FrozenBN, see `frozen_norm`).
    groups: groups of the bottleneck 3x3 convs (ResNeXt's cardinality; 1 = ResNet).
    width_per_group: channels per group of res2's 3x3 conv at width 64 (64 = ResNet); the
      bottleneck of stage k = 0..3 has groups * (width * 2^k * width_per_group / 64) channels
      (torchvision's rule; Detectron2's groups * width_per_group * 2^k at width 64).
  """

  depth: int
  width: int
  stride_in_1x1: bool
  freeze_at: int
  conv: ConvDef
  frozen_conv: ConvDef
  activation: Activation = nn.relu
  groups: int = 1
  width_per_group: int = 64
  norm_stats: str = "padded"

  @nn.compact
  def __call__(
    self, x: Array, train: bool = False, image_hw: Optional[Array] = None
  ) -> dict[str, Array]:
    if self.norm_stats != "valid":
      image_hw = None
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNet: expected images (B, H, W, 3), got {x.shape}.")
    if self.depth not in STAGE_BLOCKS:
      raise ValueError(f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {self.depth}.")
    if not 0 <= self.freeze_at <= 5:
      raise ValueError(f"freeze_at must be in 0..5, got {self.freeze_at}.")
    blocks, bottleneck = STAGE_BLOCKS[self.depth]
    if not bottleneck and (self.groups, self.width_per_group) != (1, 64):
      raise ValueError(
        f"ResNet-{self.depth} has no bottleneck: groups={self.groups} and "
        f"width_per_group={self.width_per_group} need depth 50, 101 or 152."
      )
    if self.groups < 1 or (self.width * self.width_per_group) % 64:
      raise ValueError(
        f"groups={self.groups}, width_per_group={self.width_per_group}: need groups >= 1 and "
        f"width * width_per_group (= {self.width * self.width_per_group}) a multiple of 64."
      )
    conv_of = lambda frozen: self.frozen_conv if frozen else self.conv

    frozen = self.freeze_at >= 1
    x = BasicStem(self.width, conv_of(frozen), self.activation, name="stem")(x, train, image_hw)
    if frozen:
      x = jax.lax.stop_gradient(x)
    outputs = {}
    for k, (stage, n) in enumerate(zip(STAGES, blocks)):
      out_channels = self.out_channels[stage]
      frozen = self.freeze_at >= k + 2
      x = ResStage(
        n,
        out_channels,
        self.groups * (self.width * self.width_per_group // 64) * 2**k,
        1 if k == 0 else 2,
        bottleneck,
        self.stride_in_1x1,
        conv_of(frozen),
        self.activation,
        self.groups,
        name=stage,
      )(x, train, None if image_hw is None else layers.valid_hw_at(image_hw, max(4, 2 ** (k + 1))))
      if frozen:
        x = jax.lax.stop_gradient(x)
      outputs[stage] = x
    return outputs

  @property
  def out_channels(self) -> dict[str, int]:
    bottleneck = STAGE_BLOCKS[self.depth][1]
    return {s: self.width * 2**k * (4 if bottleneck else 1) for k, s in enumerate(STAGES)}


def resnet_from_config(
  backbone: Mapping[str, Any],
  dtype: Any,
  axis_name: Optional[str] = None,
  name: Optional[str] = None,
) -> ResNet:
  """The ResNet of a config's `backbone` section (default_model_config() layout).

  dtype: conv computation dtype, e.g. "bfloat16" (params and norm statistics stay float32).
  axis_name: mapped axis for SyncBN under shard_map / pmap (None under plain jit).
  name: the module name, when built inside a parent's compact method.
  """
  norm_def = lambda norm: layers.build_norm(
    norm,
    num_groups=backbone["num_groups"],
    bn_group_size=backbone["bn_group_size"] or None,
    axis_name=axis_name,
  )
  norm = backbone["norm"] or None
  norm_stats = backbone.get("norm_stats", "padded")
  layers.check_norm_stats(norm_stats, norm)
  # Detectron2's ResNet convs have no bias, normed or not.
  conv = layers.conv_def(norm=norm_def(norm), dtype=dtype, use_bias=False)
  frozen_conv = layers.conv_def(norm=norm_def(frozen_norm(norm)), dtype=dtype, use_bias=False)
  return ResNet(
    depth=backbone["depth"],
    width=backbone["width"],
    stride_in_1x1=backbone["stride_in_1x1"],
    freeze_at=backbone["freeze_at"],
    conv=conv,
    frozen_conv=frozen_conv,
    groups=backbone["groups"],
    width_per_group=backbone["width_per_group"],
    norm_stats=norm_stats,
    name=name,
  )


def build_resnet(
  *, dtype: Any = None, axis_name: Optional[str] = None, name: Optional[str] = None, **backbone: Any
) -> ResNet:
  """A ResNet from plain values: default_model_config().backbone with `backbone` overridden.

    build_resnet(depth=18, norm="GN", width=8)   # the other fields as in the config
    build_resnet(depth=152, groups=32, width_per_group=8)   # X-152-32x8d
  dtype: None = the config's dtype. axis_name, name: as in `resnet_from_config`.
  """
  model_config = config_lib.default_model_config()
  fields = model_config.backbone.to_dict()
  unknown = sorted(set(backbone) - set(fields))
  if unknown:
    raise ValueError(f"build_resnet: unknown fields {unknown}; known: {sorted(fields)}")
  fields.update(backbone)
  return resnet_from_config(fields, model_config.dtype if dtype is None else dtype, axis_name, name)
