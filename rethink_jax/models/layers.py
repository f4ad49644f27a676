"""Conv2d with an optional norm, and the norm factory (GN, SyncBN, BN, FrozenBN).

Mirrors Detectron2's `layers.Conv2d` (a conv that owns its `.norm`) and `get_norm`, in Flax Linen:

  gn = build_norm("GN", num_groups=32)
  Conv2d(256, 3, padding=1, norm=gn)  ->  params {"kernel" (3,3,I,256), "norm": {scale, bias}}

Modules receive their layers as factories built once from the config (`conv_def`, `dense_def`,
`build_norm`), so a block says which convs it has and not how they are normed or typed.

Activations are NHWC, kernels HWIO, padding is explicit and symmetric (PyTorch semantics; never
'SAME', which is asymmetric at stride 2). Convolutions compute in `dtype` (e.g. bfloat16) while
parameters and all norm statistics stay float32.

Padding. Images of a batch sit at the top-left of a zero-padded tensor. Norm statistics are
either over that whole tensor ("padded", Detectron2's) or over each image's valid region
("valid"): then modules take `valid_hw` ((B, 2) int [h, w] of each image's valid region in their
input) and pass it down, and GroupNorm normalizes over that region only and writes 0 outside it,
so every later conv sees the zeros an unpadded image would have (the valid region's outputs equal
those of the unpadded image). valid_hw None means "padded".
"""

from collections.abc import Callable, Sequence
import functools
import math
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from rethink_jax.ops import xla_cpu

Array = jax.Array
IntOrPair = Union[int, Sequence[int]]
Activation = Callable[[Array], Array]
# Factories of built layers, passed down to the modules that use them (as flax/examples/imagenet
# passes `conv` and `norm`): NormDef(name=...) -> a norm; ConvDef(features, kernel_size, ...,
# name=...) -> a Conv2d; DenseDef(features, kernel_init=..., name=...) -> an nn.Dense.
NormDef = Callable[..., nn.Module]
ConvDef = Callable[..., nn.Module]
DenseDef = Callable[..., nn.Module]

# Detectron2's c2_msra_fill / torchvision ResNet: kaiming normal, fan_out, gain sqrt(2),
# untruncated.
msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Detectron2's c2_xavier_fill (FPN convs): kaiming uniform with a=1, i.e. U(+-sqrt(3 / fan_in)).
xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

NORMS = ("GN", "SyncBN", "BN", "FrozenBN")
NORM_STATS = ("padded", "valid")  # see the module docstring
BN_EPS = 1e-5
# Flax momentum 0.9 == PyTorch momentum 0.1 (new = m * old + (1 - m) * batch).
BN_MOMENTUM = 0.9


def _pair(v: IntOrPair) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(int(a) for a in v)
  if len(v) != 2:
    raise ValueError(f"Expected an int or a pair, got {v}.")
  return v


def _check_nhwc(x: Array, what: str, channels: Optional[int] = None):
  if x.ndim != 4 or (channels is not None and x.shape[-1] != channels):
    want = f"(B, H, W, {channels})" if channels is not None else "(B, H, W, C)"
    raise ValueError(f"{what}: expected input of shape {want}, got {x.shape}.")


def valid_hw_after(
  valid_hw: Array, kernel_size: IntOrPair, strides: IntOrPair, padding: IntOrPair, dilation=1
) -> Array:
  """Valid [h, w] (B, 2) of a conv's / pool's output from its input's: the output size of the
  unpadded image, (n + 2 p - d (k - 1) - 1) // s + 1 per axis (ceil(n / s) for this project's
  "same"-padded convs and pools, so it composes: stride 4 then 2 is ceil(n / 8))."""
  k, s, p, d = (jnp.asarray(_pair(v), jnp.int32) for v in (kernel_size, strides, padding, dilation))
  return (jnp.asarray(valid_hw, jnp.int32) + 2 * p - d * (k - 1) - 1) // s + 1


def valid_hw_at(image_hw: Array, stride: int) -> Array:
  """Valid [h, w] (B, 2) of a feature map at `stride` from the image's: ceil(image_hw / stride)."""
  return (jnp.asarray(image_hw, jnp.int32) + stride - 1) // stride


def valid_mask(valid_hw: Array, hw: tuple[int, int]) -> Array:
  """(B, H, W) bool: True inside each image's valid [h, w] (valid_hw (B, 2)) of an (H, W) map."""
  valid_hw = jnp.asarray(valid_hw, jnp.int32)
  rows = jnp.arange(hw[0])[None, :, None] < valid_hw[:, 0, None, None]
  cols = jnp.arange(hw[1])[None, None, :] < valid_hw[:, 1, None, None]
  return rows & cols


def zero_outside(x: Array, valid_hw: Optional[Array]) -> Array:
  """x (B, H, W, C) with 0 outside each image's valid region; x itself when valid_hw is None."""
  if valid_hw is None:
    return x
  return jnp.where(valid_mask(valid_hw, x.shape[1:3])[..., None], x, jnp.zeros((), x.dtype))


def group_norm_valid(
  x: Array, scale: Array, bias: Array, valid_hw: Array, num_groups: int, epsilon: float
) -> Array:
  """torch.nn.GroupNorm of each image's valid region x[b, :h_b, :w_b], zeros elsewhere.

  x (B, H, W, C), scale and bias (C,), valid_hw (B, 2) int -> (B, H, W, C) in x.dtype. The plain
  form only (autodiff gradient); statistics in float32, two-pass variance as the unmasked forms.
  """
  b, h, w, c = x.shape
  mask = valid_mask(valid_hw, (h, w)).astype(jnp.float32)[:, :, :, None, None]  # (B, H, W, 1, 1)
  xg = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
  # At least one element per group: an empty region (a padding image) gives 0, not NaN.
  n = jnp.maximum(jnp.sum(mask, axis=(1, 2), keepdims=True) * (c // num_groups), 1.0)
  mean = jnp.sum(xg * mask, axis=(1, 2, 4), keepdims=True) / n
  var = jnp.sum(jnp.square((xg - mean) * mask), axis=(1, 2, 4), keepdims=True) / n
  y = ((xg - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape)
  y = (y * scale + bias) * mask.reshape(b, h, w, 1)
  return y.astype(x.dtype)


class GroupNorm(nn.Module):
  """GroupNorm as torch.nn.GroupNorm (eps 1e-5), statistics in float32.

  x (B, H, W, C) -> (B, H, W, C) in x.dtype. params: scale (C,), bias (C,).
  `num_groups` groups when C is a multiple of it; tiny widths (C < num_groups, e.g. width=8 test
  models) use gcd(num_groups, C) groups.
  valid_hw None: statistics over the whole tensor; given: over each image's valid region, zeros
  outside it (`group_norm_valid`).
  """

  num_groups: int
  epsilon: float = 1e-5  # torch.nn.GroupNorm's

  @nn.compact
  def __call__(self, x: Array, train: bool = False, valid_hw: Optional[Array] = None) -> Array:
    del train
    _check_nhwc(x, "GroupNorm")
    c = x.shape[-1]
    g = self.num_groups if c % self.num_groups == 0 else math.gcd(self.num_groups, c)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if valid_hw is not None:
      return group_norm_valid(x, scale, bias, valid_hw, g, self.epsilon)
    return xla_cpu.group_norm(x, scale, bias, g, self.epsilon)


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch semantics, statistics in float32.

  x (B, H, W, C) -> (B, H, W, C) in x.dtype. params: scale, bias (C,); batch_stats: mean, var (C,).

  Training normalizes with biased batch statistics and updates the running statistics with the
  unbiased variance (as torch.nn.BatchNorm2d), momentum 0.9 in Flax's convention (PyTorch 0.1).
  Statistics are taken over
    - `group_size` consecutive images ("BN": per device batch, ghost-batch style; B must be a
      multiple of group_size). Under jit over a batch sharded on the data axis with group_size =
      per-device batch, every group lives on one device, so this is per-device BN;
    - the whole batch when group_size is None ("SyncBN"): under jit with a sharded global batch
      this is the global batch mean, across every device;
    - and in addition across `axis_name` (shard_map / pmap) when given.
  When several groups exist the running statistics get the mean of the groups' statistics.
  """

  group_size: Optional[int] = None
  axis_name: Optional[str] = None
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x: Array, train: bool = False, valid_hw: Optional[Array] = None) -> Array:
    _check_nhwc(x, "BatchNorm")
    if valid_hw is not None:
      raise ValueError("BatchNorm: statistics over a valid region are implemented for GN only.")
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if not train:
      a = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      return (xf * a + (bias - ra_mean.value * a)).astype(x.dtype)

    b = x.shape[0]
    g = b if not self.group_size else self.group_size
    if b % g:
      raise ValueError(f"BatchNorm: batch {x.shape} is not a multiple of group_size={g}.")
    xg = xf.reshape((b // g, g) + x.shape[1:])  # (groups, g, H, W, C)
    mean = jnp.mean(xg, axis=(1, 2, 3), keepdims=True)
    n = g * x.shape[1] * x.shape[2]
    if self.axis_name is not None:
      mean = jax.lax.pmean(mean, self.axis_name)
      n = n * jax.lax.psum(1, self.axis_name)
    # Centered second pass for the variance: E[x^2] - E[x]^2 loses precision in float32.
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 3), keepdims=True)
    if self.axis_name is not None:
      var = jax.lax.pmean(var, self.axis_name)
    a = jax.lax.rsqrt(var + self.epsilon) * scale  # per (group, channel) affine
    y = (xg * a + (bias - mean * a)).reshape(x.shape)
    if not self.is_initializing():
      unbiased = var * (n / max(n - 1, 1))
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * jnp.mean(
        mean, axis=(0, 1, 2, 3)
      )
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * jnp.mean(
        unbiased, axis=(0, 1, 2, 3)
      )
    return y.astype(x.dtype)


class FrozenBatchNorm(nn.Module):
  """A fixed per-channel affine y = x * scale + bias (Detectron2's FrozenBatchNorm2d, folded).

  x (..., C) -> (..., C) in x.dtype. Variables scale (C,), bias (C,) live in the collection
  "frozen", not "params", so no optimizer ever sees them. From BN statistics:
  scale = gamma / sqrt(var + eps), bias = beta - mean * scale (rethink_jax.convert does this).
  """

  @nn.compact
  def __call__(self, x: Array, train: bool = False, valid_hw: Optional[Array] = None) -> Array:
    del train
    if valid_hw is not None:  # its bias would fill the padding that "valid" keeps 0
      raise ValueError("FrozenBatchNorm: statistics over a valid region are for GN only.")
    c = x.shape[-1]
    scale = self.variable("frozen", "scale", lambda: jnp.ones((c,), jnp.float32)).value
    bias = self.variable("frozen", "bias", lambda: jnp.zeros((c,), jnp.float32)).value
    if scale.shape != (c,) or bias.shape != (c,):
      raise ValueError(
        f"FrozenBatchNorm: input {x.shape} vs scale {scale.shape}, bias {bias.shape}."
      )
    return (x.astype(jnp.float32) * scale + bias).astype(x.dtype)


def build_norm(
  norm: Optional[str],
  *,
  num_groups: Optional[int] = None,
  bn_group_size: Optional[int] = None,
  axis_name: Optional[str] = None,
) -> Optional[NormDef]:
  """The norm factory for `norm` in {"GN", "SyncBN", "BN", "FrozenBN"}, or None for None / "".

  The factory builds a module called as `module(x (B,H,W,C), train, valid_hw=None) ->
  (B,H,W,C)`; Conv2d builds it as `norm(name="norm")`. num_groups: GroupNorm groups (needed for
  "GN"). bn_group_size: images per statistics group for "BN" (the per-device batch; None or 0 =
  whole batch). axis_name: for "SyncBN" under shard_map / pmap. valid_hw: GroupNorm only.
  """
  if not norm:
    return None
  if norm == "GN":
    if not num_groups:
      raise ValueError("build_norm('GN') needs num_groups.")
    return functools.partial(GroupNorm, num_groups=num_groups)
  if norm == "SyncBN":
    return functools.partial(BatchNorm, group_size=None, axis_name=axis_name)
  if norm == "BN":
    return functools.partial(BatchNorm, group_size=bn_group_size or None, axis_name=None)
  if norm == "FrozenBN":
    return FrozenBatchNorm
  raise ValueError(f"Unknown norm {norm!r}; expected one of {NORMS} or None.")


class Conv2d(nn.Module):
  """2D convolution with explicit symmetric padding, optional norm and activation.

  x (B, H, W, Cin) -> (B, H', W', features), H' = (H + 2 p - d (k - 1) - 1) // s + 1.
  params: "kernel" (kh, kw, Cin // groups, features) [+ "bias" (features,)]; submodule "norm".
  valid_hw: (B, 2) valid [h, w] of x ("valid" statistics), None = "padded"; the norm gets its
  output's (`valid_hw_after`).

  Attributes:
    padding: int or (ph, pw), symmetric; None = kernel_size // 2 * dilation ("same" at stride 1).
    use_bias: None = no bias when normed (Detectron2's rule), else as given.
    norm: a norm factory (`build_norm`), built as the submodule "norm"; None = no norm.
    dtype: computation dtype of the conv (params stay float32; norms compute in float32).
  """

  features: int
  kernel_size: IntOrPair
  strides: IntOrPair = 1
  padding: Optional[IntOrPair] = None
  dilation: IntOrPair = 1
  groups: int = 1
  use_bias: Optional[bool] = None
  norm: Optional[NormDef] = None
  activation: Optional[Activation] = None
  kernel_init: Callable = msra_fill
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False, valid_hw: Optional[Array] = None) -> Array:
    _check_nhwc(x, "Conv2d")
    kh, kw = _pair(self.kernel_size)
    sh, sw = _pair(self.strides)
    dh, dw = _pair(self.dilation)
    if self.padding is None:
      ph, pw = (kh // 2) * dh, (kw // 2) * dw
    else:
      ph, pw = _pair(self.padding)
    cin = x.shape[-1]
    if cin % self.groups or self.features % self.groups:
      raise ValueError(
        f"Conv2d: input {x.shape} / features {self.features} not divisible by groups={self.groups}."
      )
    use_bias = (self.norm is None) if self.use_bias is None else self.use_bias
    kernel = self.param(
      "kernel", self.kernel_init, (kh, kw, cin // self.groups, self.features), jnp.float32
    )
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    y = xla_cpu.conv2d(
      x, kernel, strides=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=self.groups
    )
    if use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = xla_cpu.add_bias(y, bias.astype(self.dtype))
    if self.norm is not None:
      out_valid = None
      if valid_hw is not None:
        out_valid = valid_hw_after(valid_hw, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
      y = self.norm(name="norm")(y, train, valid_hw=out_valid)
    if self.activation is not None:
      y = self.activation(y)
    return y


def check_norm_stats(norm_stats: str, *norms: Optional[str]) -> bool:
  """True for "valid" (modules then pass valid_hw down), False for "padded"; "valid" needs every
  norm of the network to be GN (a BN or an unnormed conv with a bias would fill the padding)."""
  if norm_stats not in NORM_STATS:
    raise ValueError(f"norm_stats must be one of {NORM_STATS}, got {norm_stats!r}.")
  if norm_stats == "valid" and any(n != "GN" for n in norms):
    raise ValueError(f"norm_stats 'valid' needs GN norms, got {norms}.")
  return norm_stats == "valid"


def conv_def(*, norm: Optional[NormDef], dtype: Any, **kwargs) -> ConvDef:
  """Conv2d with `norm` and compute `dtype` bound: the `conv` the backbone and heads receive."""
  return functools.partial(Conv2d, norm=norm, dtype=jnp.dtype(dtype), **kwargs)


def dense_def(*, dtype: Any) -> DenseDef:
  """nn.Dense computing in `dtype` with float32 parameters: the `dense` the box heads receive."""
  return functools.partial(nn.Dense, dtype=jnp.dtype(dtype), param_dtype=jnp.float32)
