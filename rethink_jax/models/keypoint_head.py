"""Keypoint R-CNN's head (Detectron2's KRCNNConvDeconvUpsampleHead), its loss and its inference.

Head: conv_dims x (conv 3x3 with bias + ReLU), score_lowres (ConvTranspose 4x4, stride 2,
padding 1, to one channel per keypoint), then x2 bilinear upsampling (align_corners=False):
(R, 14, 14, C) ROI features -> (R, 56, 56, K) heatmap logits, float32.

Parameters (Detectron2's names): conv_fcn1 .. conv_fcnN {kernel (3, 3, C_in, C_out), bias},
score_lowres {kernel (4, 4, C_in, K), bias (K,)} with kernel[a, b, c, o] = PyTorch's
ConvTranspose2d weight[c, o, a, b] (the layout of the mask head's deconv).

Loss (keypoint_rcnn_loss): softmax cross-entropy over the S*S cells of each keypoint's heatmap
against its target cell (ops.keypoints.keypoints_to_heatmap), summed over the valid ROIs'
visible, in-ROI keypoints and divided by their number (Detectron2's "visible" normaliser) or by
a given normaliser (Detectron2: num_images * K * batch_size_per_image * positive_fraction).
Inference: ops.keypoints.heatmaps_to_keypoints.
"""

from collections.abc import Sequence
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rethink_jax.models import layers
from rethink_jax.models.layers import Activation
from rethink_jax.models.layers import ConvDef
from rethink_jax.ops import keypoints as keypoint_ops
from rethink_jax.ops import xla_cpu

Array = jax.Array
# PyTorch's kaiming_normal_(fan_out) of a (C_in, C_out, 4, 4) weight: std sqrt(2 / (16 C_in)),
# the fan_in of our (4, 4, C_in, C_out) kernel.
_DECONV_FILL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _deconv_taps() -> np.ndarray:
  """(3, 2, 4) one-hot: tap t of a 3x3 conv (input offset t - 1) gives output parity p the
  4x4 transposed kernel's row a = 3 + p - 2 t (stride 2, padding 1), when 0 <= a <= 3."""
  taps = np.zeros((3, 2, 4), np.float32)
  for t in range(3):
    for p in range(2):
      a = 3 + p - 2 * t
      if 0 <= a <= 3:
        taps[t, p, a] = 1.0
  return taps


class ConvTranspose4x4(nn.Module):
  """ConvTranspose2d(C_in, features, 4, stride=2, padding=1) as one 3x3 conv to 4 * features
  channels (one group per output parity) and a pixel shuffle: a plain stride-1 conv everywhere.

  Owns "kernel" (4, 4, C_in, features), kernel[a, b, c, o] = PyTorch weight[c, o, a, b], and
  "bias" (features,).
  __call__(x (R, H, W, C_in)) -> (R, 2H, 2W, features), computed in x's dtype.
  """

  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    r, h, w, c = x.shape
    kernel = self.param("kernel", _DECONV_FILL, (4, 4, c, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    taps = jnp.asarray(_deconv_taps())
    k3 = jnp.einsum("tpa,sqb,abco->tscpqo", taps, taps, kernel)
    k3 = k3.reshape(3, 3, c, 4 * self.features).astype(x.dtype)
    y = xla_cpu.conv2d(x, k3, strides=(1, 1), padding=(1, 1))
    y = y.reshape(r, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(r, 2 * h, 2 * w, self.features)
    return xla_cpu.add_bias(y, bias.astype(x.dtype))


class KRCNNConvDeconvUpsampleHead(nn.Module):
  """Detectron2's keypoint head. __call__(x (R, S, S, C), train) -> (R, 4S, 4S, K) float32 logits.

  Attributes:
    num_keypoints: K.
    conv_dims: output channels of each 3x3 conv (Detectron2: (512,) * 8).
    conv: the head's Conv2d factory (layers.conv_def, norm None: the convs carry a bias).
  """

  num_keypoints: int
  conv_dims: Sequence[int]
  conv: ConvDef
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if x.ndim != 4:
      raise ValueError(f"keypoint head input must be (R, S, S, C), got {x.shape}")
    if not self.conv_dims:
      raise ValueError("the keypoint head needs conv_dims (its convs set the dtype)")
    for i, dim in enumerate(self.conv_dims):
      x = self.conv(dim, 3, padding=1, kernel_init=layers.msra_fill, name=f"conv_fcn{i + 1}")(
        x, train=train
      )
      x = self.activation(x)
    x = ConvTranspose4x4(self.num_keypoints, name="score_lowres")(x).astype(jnp.float32)
    up = jnp.asarray(keypoint_ops.bilinear_upsample_matrix(x.shape[1]))
    return jnp.einsum("ih,rhwk,jw->rijk", up, x, up)


def keypoint_rcnn_loss(
  logits: Array,
  rois: Array,
  gt_keypoints: Array,
  valid: Array,
  normalizer: Optional[float] = None,
) -> Array:
  """Detectron2's keypoint_rcnn_loss over N ROI slots.

  Args:
    logits: (N, S, S, K) heatmap logits; rois: (N, 4) the ROIs (proposal boxes); gt_keypoints:
      (N, K, 3) [x, y, v] of each ROI's matched instance; valid: (N,) bool slots that count.
    normalizer: None = the number of valid keypoints (visible and inside their ROI) in the
      batch; else this number.
  Returns:
    float32 scalar: summed cross-entropy / normaliser (0 when no keypoint is valid).
  """
  n, s, s2, k = logits.shape
  if s != s2 or rois.shape != (n, 4) or gt_keypoints.shape != (n, k, 3) or valid.shape != (n,):
    raise ValueError(
      f"logits {logits.shape}, rois {rois.shape}, gt_keypoints {gt_keypoints.shape}, valid "
      f"{valid.shape}: want (N, S, S, K), (N, 4), (N, K, 3), (N,)"
    )
  target, visible = keypoint_ops.keypoints_to_heatmap(gt_keypoints, rois, s)
  weight = (visible & valid[:, None]).astype(jnp.float32)  # (N, K)
  flat = logits.astype(jnp.float32).transpose(0, 3, 1, 2).reshape(n, k, s * s)
  picked = jnp.take_along_axis(flat, target[..., None], axis=-1)[..., 0]
  ce = jax.nn.logsumexp(flat, axis=-1) - picked
  total = jnp.sum(jnp.where(weight > 0, ce, 0.0))
  if normalizer is None:
    return total / jnp.maximum(jnp.sum(weight), 1.0)
  return total / normalizer
