"""Ops with a form that XLA:CPU runs faster, each beside its plain reference form.

`choose_form(cpu_form, reference_form, *arrays, tpu_form=None, **static)` is the one choice
between them: it stages the forms, and lowering keeps the one for the platform compiled for
(jax.lax.platform_dependent), also for a TPU program compiled ahead of time on a CPU host.
Programs for CPU get the `*_cpu` form; TPU programs the `*_tpu` form where one exists (the 1x1
matmul and GroupNorm's written-out gradient, which take less memory there); every other platform
the `*_reference` form. The public functions below (conv2d, group_norm,
add_bias, max_pool, weighted_rows, nms_indices) are what models/ and ops/ call; both forms of each
are importable by name so that the tests compare them (tests/ops/test_xla_cpu.py).

The CPU forms compute the same values in another order or layout: XLA:CPU emits some reductions
as strided window reductions, runs autodiff's conv gradients slowly inside conditionals and a
grouped conv's kernel gradient slowly everywhere, and fuses gathers into transposes in a
cache-hostile order (figures in docs/performance.md). Convolutions other than 1x1, which XLA:CPU
runs 1.2 to 8 times slower than oneDNN, are oneDNN custom calls on CPU where those can be built
(ops/onednn.py).
"""

from collections.abc import Callable, Hashable
import functools
from typing import Any, NamedTuple, Optional, TypeVar

import jax
import jax.numpy as jnp

from rethink_jax.ops import onednn

Array = jax.Array
T = TypeVar("T")


def choose_form(
  cpu_form: Callable[..., T],
  reference_form: Callable[..., T],
  *arrays: Any,
  tpu_form: Optional[Callable[..., T]] = None,
  **static: Hashable,
) -> T:
  """cpu_form(*arrays, **static) in programs lowered for CPU, tpu_form(...) for TPU when given,
  reference_form(...) elsewhere.

  Every form is traced (platform_dependent keeps one when lowering) and must return the same
  shapes and dtypes; `static` are non-array arguments (shapes, thresholds).
  """
  key = tuple(sorted(static.items()))
  forms = dict(cpu=_bind(cpu_form, key), default=_bind(reference_form, key))
  if tpu_form is not None:
    forms["tpu"] = _bind(tpu_form, key)
  return jax.lax.platform_dependent(*arrays, **forms)


@functools.cache
def _bind(form: Callable[..., T], static: tuple[tuple[str, Hashable], ...]) -> Callable[..., T]:
  # One function object per (form, static arguments): JAX reuses its traces of a function
  # object, which makes repeated blocks (same shapes) cheap to trace.
  return functools.partial(form, **dict(static))


# Convolution. ------------------------------------------------------------------------------------


class ConvSpec(NamedTuple):
  """The static arguments of a 2D convolution (symmetric padding)."""

  strides: tuple[int, int]
  padding: tuple[int, int]
  dilation: tuple[int, int] = (1, 1)
  groups: int = 1


def conv2d_reference(x: Array, kernel: Array, spec: ConvSpec) -> Array:
  """x (B, H, W, I) * kernel (kh, kw, I / groups, O) -> (B, H', W', O)."""
  (ph, pw) = spec.padding
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=spec.strides,
    padding=((ph, ph), (pw, pw)),
    rhs_dilation=spec.dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=spec.groups,
  )


def _conv_nhwc(x: Array, kernel: Array, padding: tuple[int, int]) -> Array:
  return conv2d_reference(x, kernel, ConvSpec((1, 1), padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_stride1_cpu(x: Array, kernel: Array, padding: tuple[int, int]) -> Array:
  """Stride-1 conv, padding <= k - 1, whose gradients are forward (NHWC x HWIO) convolutions.

  XLA:CPU runs the convolutions that autodiff emits for a conv's gradients slowly inside a
  conditional, and the mask branch runs in conditionals (roi_heads' _mask_logits).
  """
  return _conv_nhwc(x, kernel, padding)


def _conv_stride1_cpu_fwd(x, kernel, padding):
  return _conv_nhwc(x, kernel, padding), (x, kernel)


def _conv_stride1_cpu_bwd(padding, residuals, dy):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  ph, pw = padding
  # Input gradient: dy correlated with the spatially flipped kernel, in/out channels swapped.
  dx = _conv_nhwc(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), (kh - 1 - ph, kw - 1 - pw))
  # Kernel gradient: channels act as the batch and images as input channels; dy is the kernel.
  dk = _conv_nhwc(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), padding)
  return dx, dk.transpose(1, 2, 0, 3)


_conv_stride1_cpu.defvjp(_conv_stride1_cpu_fwd, _conv_stride1_cpu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def grouped_conv_xla(x: Array, kernel: Array, spec: ConvSpec) -> Array:
  """A grouped conv whose gradients are batched matmuls, one per kernel tap (conv2d_cpu_xla's
  grouped form).

  XLA:CPU runs the kernel gradient that autodiff emits for a grouped conv (a batch-grouped
  convolution) one to two orders of magnitude slower than torch, and a strided one's input
  gradient (an input-dilated convolution) several times slower than its forward.
  """
  return conv2d_reference(x, kernel, spec)


def _grouped_conv_xla_fwd(x, kernel, spec):
  return conv2d_reference(x, kernel, spec), (x, kernel)


def _grouped_conv_xla_bwd(spec, residuals, dy):
  x, kernel = residuals
  kh, kw, cin_per_group, cout = kernel.shape
  g = spec.groups
  b, h, w, cin = x.shape
  _, ho, wo, _ = dy.shape
  (sh, sw), (ph, pw), (dh, dw) = spec.strides, spec.padding, spec.dilation
  dy_groups = dy.reshape(b * ho * wo, g, cout // g)
  kernel_groups = kernel.reshape(kh, kw, cin_per_group, g, cout // g)
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  dk_taps, dx = [], None
  for i in range(kh):
    for j in range(kw):
      # The input pixels that tap (i, j) meets, one per output pixel (rows i*dh + r*sh of xp).
      start = (0, i * dh, j * dw, 0)
      limit = (b, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, cin)
      xs = jax.lax.slice(xp, start, limit, (1, sh, sw, 1)).reshape(-1, g, cin_per_group)
      dk_taps.append(jnp.einsum("ngc,ngo->cgo", xs, dy_groups, preferred_element_type=jnp.float32))
      if (sh, sw) != (1, 1):
        # The tap's input gradient goes back to those pixels: interior padding spaces it out.
        part = jnp.einsum(
          "ngo,cgo->ngc", dy_groups, kernel_groups[i, j], preferred_element_type=jnp.float32
        ).reshape(b, ho, wo, cin)
        lo_h, lo_w = i * dh - ph, j * dw - pw
        pads = (
          (0, 0, 0),
          (lo_h, h - lo_h - (ho - 1) * sh - 1, sh - 1),
          (lo_w, w - lo_w - (wo - 1) * sw - 1, sw - 1),
          (0, 0, 0),
        )
        part = jax.lax.pad(part, jnp.zeros((), part.dtype), pads)
        dx = part if dx is None else dx + part
  if dx is not None:
    dx = dx.astype(x.dtype)
  else:  # stride 1: autodiff's input gradient is a plain grouped conv, fast as it is
    _, input_vjp = jax.vjp(lambda x: conv2d_reference(x, kernel, spec), x)
    (dx,) = input_vjp(dy)
  dk = jnp.stack(dk_taps).reshape(kh, kw, cin_per_group, cout).astype(kernel.dtype)
  return dx, dk


grouped_conv_xla.defvjp(_grouped_conv_xla_fwd, _grouped_conv_xla_bwd)


def _is_plain_1x1(kernel: Array, spec: ConvSpec) -> bool:
  return (kernel.shape[:2], spec.padding, spec.dilation, spec.groups) == ((1, 1), (0, 0), (1, 1), 1)


def conv2d_tpu(x: Array, kernel: Array, spec: ConvSpec) -> Array:
  """conv2d_reference, with 1x1 convs as 2D (B*H'*W', I) @ (I, O) matmuls (on TPU the v5e train
  step keeps ~2.9 GiB fewer temporaries per chip than with 1x1 convolutions)."""
  if not _is_plain_1x1(kernel, spec):
    return conv2d_reference(x, kernel, spec)
  x = x[:, :: spec.strides[0], :: spec.strides[1], :]
  return (x.reshape(-1, x.shape[-1]) @ kernel[0, 0]).reshape(*x.shape[:3], kernel.shape[-1])


def _onednn_applies(x: Array, kernel: Array) -> bool:
  # One device only: XLA's SPMD partitioner does not split a custom call, it gathers the whole
  # batch onto every device (correct, but each device would compute every image).
  f32 = x.dtype == kernel.dtype == jnp.float32
  return f32 and jax.device_count() == 1 and onednn.available()


def conv2d_cpu(x: Array, kernel: Array, spec: ConvSpec) -> Array:
  """1x1 convs as matmuls (conv2d_tpu: XLA:CPU runs a dot_general's backward faster than a
  conv's, and as a 2D product, since through a 4D einsum it writes the incoming gradient
  transposed for the kernel gradient); every other float32 conv on one device as oneDNN's
  primitives (1.2-2.8x faster than XLA:CPU's dense convs, 3-8x its grouped ones); otherwise (no
  oneDNN, another dtype, several devices) conv2d_cpu_xla."""
  if _is_plain_1x1(kernel, spec):
    return conv2d_tpu(x, kernel, spec)
  if _onednn_applies(x, kernel):
    return onednn.conv2d(x, kernel, spec.strides, spec.padding, spec.dilation, spec.groups)
  return conv2d_cpu_xla(x, kernel, spec)


def conv2d_cpu_xla(x: Array, kernel: Array, spec: ConvSpec) -> Array:
  """A conv in XLA's own ops for CPU: grouped ones as grouped_conv_xla, stride-1 ones with their
  gradients as forward convs, the rest as the reference."""
  if spec.groups > 1:
    return grouped_conv_xla(x, kernel, spec)
  (kh, kw), (ph, pw) = kernel.shape[:2], spec.padding
  if (spec.strides, spec.dilation) == ((1, 1), (1, 1)) and ph < kh and pw < kw:
    return _conv_stride1_cpu(x, kernel, (ph, pw))
  return conv2d_reference(x, kernel, spec)


def conv2d(
  x: Array,
  kernel: Array,
  *,
  strides: tuple[int, int],
  padding: tuple[int, int],
  dilation: tuple[int, int] = (1, 1),
  groups: int = 1,
) -> Array:
  """x (B, H, W, I) * kernel (kh, kw, I / groups, O) -> (B, H', W', O), symmetric padding."""
  spec = ConvSpec(tuple(strides), tuple(padding), tuple(dilation), groups)
  return choose_form(conv2d_cpu, conv2d_reference, x, kernel, tpu_form=conv2d_tpu, spec=spec)


# GroupNorm. --------------------------------------------------------------------------------------


def group_norm_reference(
  x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float
) -> Array:
  """torch.nn.GroupNorm on NHWC: x (B, H, W, C), scale and bias (C,) -> (B, H, W, C) in x.dtype.

  Statistics and arithmetic in float32; two-pass variance (E[x^2] - E[x]^2 cancels in float32).
  """
  b, h, w, c = x.shape
  xg = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
  mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
  y = ((xg - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape)
  return (y * scale + bias).astype(x.dtype)


def _group_sums(a: Array, unroll: int = 8) -> Array:
  """(B, H, W, G, C/G) -> (B, 1, 1, G, 1) sums over H, W and C/G.

  First `unroll` slabs of rows are added elementwise, and only the (B, H / unroll, W, G, C/G)
  sum is a reduction: XLA:CPU reduces the full array per (image, group) slowly.
  """
  h = a.shape[1]
  k = max(d for d in range(1, min(unroll, h) + 1) if h % d == 0)
  slabs = a.reshape(a.shape[0], k, h // k, *a.shape[2:])
  partial = slabs[:, 0]
  for i in range(1, k):
    partial = partial + slabs[:, i]
  return jnp.sum(partial, axis=(1, 2, 4), keepdims=True)


def _column_sums(a: Array) -> Array:
  """(N, C) -> (C,) sums over N, as a product with a row of ones.

  XLA:CPU emits the reduction (folded back into the activation's (B, H, W, C) shape) as strided
  window reductions; the product reads the rows in order. The barrier keeps XLA from rewriting
  the product back into that reduction.
  """
  ones = jax.lax.optimization_barrier(jnp.ones((1, a.shape[0]), a.dtype))
  return (ones @ a)[0]


def _plain_group_sums(a: Array) -> Array:
  """(B, H, W, G, C/G) -> (B, 1, 1, G, 1) sums over H, W and C/G."""
  return jnp.sum(a, axis=(1, 2, 4), keepdims=True)


def _plain_column_sums(a: Array) -> Array:
  """(N, C) -> (C,) sums over N."""
  return jnp.sum(a, axis=0)


def _group_norm_with_written_gradient(
  group_sums: Callable[[Array], Array], column_sums: Callable[[Array], Array]
) -> Callable:
  """group_norm_reference with a written-out gradient (custom VJP) using these sums.

  Every reduction over the activations runs in the (B, H, W, G, C/G) layout, the parameter
  gradients are one (B*H*W, C) column sum each (autodiff sums per (image, channel) over (H, W)),
  and the residuals are x and two (B, G) statistics.
  """

  def forward(x, scale, bias, num_groups, epsilon):
    b, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
    n = h * w * (c // num_groups)
    mean = group_sums(xg) / n  # (B, 1, 1, G, 1)
    inv = jax.lax.rsqrt(group_sums(jnp.square(xg - mean)) / n + epsilon)
    # One per-(image, channel) affine over x: y = x * a + shift.
    a = inv * scale.reshape(num_groups, c // num_groups)  # (B, 1, 1, G, C/G)
    shift = bias.reshape(num_groups, c // num_groups) - mean * a
    y = x.astype(jnp.float32) * a.reshape(b, 1, 1, c) + shift.reshape(b, 1, 1, c)
    return y.astype(x.dtype), (x, scale, mean, inv)

  def backward(num_groups, epsilon, res, dy):
    """dx = inv * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = dy * scale."""
    del epsilon
    x, scale, mean, inv = res
    b, h, w, c = x.shape
    n = h * w * (c // num_groups)
    xg = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
    dyg = dy.astype(jnp.float32).reshape(xg.shape)
    xhat = (xg - mean) * inv
    dxhat = dyg * scale.reshape(num_groups, c // num_groups)
    mean_dxhat = group_sums(dxhat) / n
    mean_dxhat_xhat = group_sums(dxhat * xhat) / n
    dx = inv * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
    dscale = column_sums((dyg * xhat).reshape(-1, c))
    dbias = column_sums(dyg.reshape(-1, c))
    return dx.reshape(x.shape).astype(x.dtype), dscale, dbias

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
  def group_norm_written(
    x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float
  ) -> Array:
    return forward(x, scale, bias, num_groups, epsilon)[0]

  group_norm_written.defvjp(forward, backward)
  return group_norm_written


# On CPU with slab sums and column sums as products; on TPU with plain sums (there the slabs took
# 2.3 GiB more temporaries, and autodiff's gradient ~2.9 GiB more, in the v5e train step).
group_norm_cpu = _group_norm_with_written_gradient(_group_sums, _column_sums)
group_norm_tpu = _group_norm_with_written_gradient(_plain_group_sums, _plain_column_sums)


def group_norm(x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float) -> Array:
  """torch.nn.GroupNorm on NHWC: x (B, H, W, C), scale and bias (C,) -> (B, H, W, C) in x.dtype."""
  return choose_form(
    group_norm_cpu,
    group_norm_reference,
    x,
    scale,
    bias,
    tpu_form=group_norm_tpu,
    num_groups=num_groups,
    epsilon=epsilon,
  )


# Bias. -------------------------------------------------------------------------------------------


def add_bias_reference(y: Array, bias: Array) -> Array:
  """y (..., C) + bias (C,)."""
  return y + bias


@jax.custom_vjp
def add_bias_cpu(y: Array, bias: Array) -> Array:
  """y (..., C) + bias (C,); the bias gradient is one column sum over all the other axes."""
  return y + bias


def _add_bias_cpu_fwd(y, bias):
  return y + bias, None


def _add_bias_cpu_bwd(_, g):
  return g, _column_sums(g.reshape(-1, g.shape[-1]).astype(jnp.float32)).astype(g.dtype)


add_bias_cpu.defvjp(_add_bias_cpu_fwd, _add_bias_cpu_bwd)


def add_bias(y: Array, bias: Array) -> Array:
  """y (..., C) + bias (C,)."""
  return choose_form(add_bias_cpu, add_bias_reference, y, bias)


# Max-pool. ---------------------------------------------------------------------------------------


def max_pool_reference(x: Array, window: int = 3, stride: int = 2, padding: int = 1) -> Array:
  """PyTorch max_pool2d: x (B, H, W, C) -> (B, H', W', C), symmetric -inf padding.

  The gradient goes to the first maximum of each window in row-major order, as in PyTorch.
  """
  return jax.lax.reduce_window(
    x,
    -jnp.inf,
    jax.lax.max,
    (1, window, window, 1),
    (1, stride, stride, 1),
    ((0, 0), (padding, padding), (padding, padding), (0, 0)),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_cpu(x: Array, window: int = 3, stride: int = 2, padding: int = 1) -> Array:
  """max_pool_reference with its gradient as one strided comparison per window tap.

  Autodiff's select-and-scatter runs on XLA:CPU as a scatter.
  """
  return max_pool_reference(x, window, stride, padding)


def _max_pool_cpu_fwd(x, window, stride, padding):
  y = max_pool_reference(x, window, stride, padding)
  return y, (x, y)


def _max_pool_cpu_bwd(window, stride, padding, res, g):
  x, y = res
  _, h, w, _ = x.shape
  _, oh, ow, _ = y.shape
  xp = jnp.pad(
    x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf
  )
  span_h, span_w = stride * (oh - 1) + 1, stride * (ow - 1) + 1
  zero = jnp.zeros((), g.dtype)
  taken = jnp.zeros(y.shape, bool)  # the window's maximum was found at an earlier tap
  dxp = jnp.zeros(xp.shape, g.dtype)
  for i in range(window):
    for j in range(window):
      hit = (xp[:, i : i + span_h : stride, j : j + span_w : stride] == y) & ~taken
      taken = taken | hit
      # Place tap (i, j)'s gradients at their input positions: interior padding = stride - 1.
      dxp = dxp + jax.lax.pad(
        jnp.where(hit, g, zero),
        zero,
        (
          (0, 0, 0),
          (i, xp.shape[1] - i - span_h, stride - 1),
          (j, xp.shape[2] - j - span_w, stride - 1),
          (0, 0, 0),
        ),
      )
  return (dxp[:, padding : padding + h, padding : padding + w],)


max_pool_cpu.defvjp(_max_pool_cpu_fwd, _max_pool_cpu_bwd)


def max_pool(x: Array, window: int = 3, stride: int = 2, padding: int = 1) -> Array:
  """PyTorch max_pool2d: x (B, H, W, C) -> (B, H', W', C), symmetric -inf padding."""
  return choose_form(
    max_pool_cpu, max_pool_reference, x, window=window, stride=stride, padding=padding
  )


# RoIAlign's weighted row sums. -------------------------------------------------------------------


def _gather_sum(flat: Array, index: Array, weight: Array) -> Array:
  """sum_k weight[..., k] * flat[index[..., k]], as K row gathers added up.

  XLA fuses them into one loop that reads each row once; a single (..., K, C) gather followed
  by a reduction would materialise K times the output.
  """
  out = None
  for k in range(index.shape[-1]):
    rows = jnp.take(flat, index[..., k], axis=0, mode="clip").astype(jnp.float32)
    term = rows * weight[..., k, :]
    out = term if out is None else out + term
  return out.astype(flat.dtype)


def _weighted_rows_res(flat, index, weight):
  # The backward needs flat's shape and dtype: carried as an empty array.
  return index, weight, jnp.zeros((0,) + flat.shape, flat.dtype)


@jax.custom_vjp
def weighted_rows_reference(flat: Array, index: Array, weight: Array) -> Array:
  """sum_k weight[..., k] * flat[index[..., k]]: (S, C), (..., K) int, (..., K, 1) -> (..., C).

  The gradient of flat is one scatter-add of all taps (torchvision's RoIAlign backward); index
  and weight get none.
  """
  return _gather_sum(flat, index, weight)


def _weighted_rows_reference_fwd(flat, index, weight):
  return _gather_sum(flat, index, weight), _weighted_rows_res(flat, index, weight)


def _weighted_rows_reference_bwd(res, g):
  index, weight, like = res
  flat = (
    jnp.zeros(like.shape[1:], jnp.float32)
    .at[index]
    .add(g.astype(jnp.float32)[..., None, :] * weight, mode="drop")
  )
  return flat.astype(like.dtype), None, None


weighted_rows_reference.defvjp(_weighted_rows_reference_fwd, _weighted_rows_reference_bwd)


def _materialize(x: Array) -> Array:
  """x, written once to memory: an identity that XLA cannot fuse into x's consumers.

  The head conv's kernel gradient reads the pooled features transposed (ROIs contracted);
  XLA:CPU fuses the K gathers into that transpose and recomputes them in its cache-hostile order.
  A scatter is never fused into its consumers (optimization_barrier is removed before fusion).
  """
  rows = jnp.arange(x.shape[0])
  return jnp.zeros_like(x).at[rows].set(x, unique_indices=True, indices_are_sorted=True)


@jax.custom_vjp
def weighted_rows_cpu(flat: Array, index: Array, weight: Array) -> Array:
  """weighted_rows_reference, its sum written to memory once and its backward a loop of taps.

  One in-place scatter-add per tap: the (..., K, C) updates of the single scatter are never
  materialised.
  """
  return _materialize(_gather_sum(flat, index, weight))


def _weighted_rows_cpu_fwd(flat, index, weight):
  return weighted_rows_cpu(flat, index, weight), _weighted_rows_res(flat, index, weight)


def _weighted_rows_cpu_bwd(res, g):
  index, weight, like = res
  g = g.astype(jnp.float32)
  idx_t = jnp.moveaxis(index, -1, 0)
  w_t = jnp.moveaxis(weight, -2, 0)
  body = lambda k, acc: acc.at[idx_t[k]].add(g * w_t[k], mode="drop")
  flat = jax.lax.fori_loop(0, index.shape[-1], body, jnp.zeros(like.shape[1:], jnp.float32))
  return flat.astype(like.dtype), None, None


weighted_rows_cpu.defvjp(_weighted_rows_cpu_fwd, _weighted_rows_cpu_bwd)


def weighted_rows(flat: Array, index: Array, weight: Array) -> Array:
  """sum_k weight[..., k] * flat[index[..., k]]: (S, C), (..., K) int, (..., K, 1) -> (..., C)."""
  return choose_form(weighted_rows_cpu, weighted_rows_reference, flat, index, weight)


# Greedy NMS. -------------------------------------------------------------------------------------


def _pairwise_over(
  a: tuple[Array, ...],
  b: tuple[Array, ...],
  ca: Optional[Array],
  cb: Optional[Array],
  iou_threshold: float,
) -> Array:
  """Coordinates (x1, y1, x2, y2) of (T,) and of (N,) boxes -> (T, N) bool: IoU > threshold.

  With classes ca (T,), cb (N,) only boxes of the same class count as overlapping.
  """
  ax1, ay1, ax2, ay2 = a
  bx1, by1, bx2, by2 = b
  area_a = (ax2 - ax1) * (ay2 - ay1)
  area_b = (bx2 - bx1) * (by2 - by1)
  w = jnp.maximum(
    jnp.minimum(ax2[:, None], bx2[None, :]) - jnp.maximum(ax1[:, None], bx1[None, :]), 0.0
  )
  h = jnp.maximum(
    jnp.minimum(ay2[:, None], by2[None, :]) - jnp.maximum(ay1[:, None], by1[None, :]), 0.0
  )
  inter = w * h
  over = inter / (area_a[:, None] + area_b[None, :] - inter) > iou_threshold
  if ca is not None:
    over = over & (ca[:, None] == cb[None, :])
  return over


def tiled_nms(
  boxes: Array,
  scores: Array,
  classes: Optional[Array],
  iou_threshold: float,
  max_output: int,
  tile: int = 512,
) -> tuple[Array, Array]:
  """Greedy NMS in one step per tile of T boxes sorted by score (the TPU Mask R-CNN's form).

  The tile is first suppressed by every box kept in earlier tiles (a T x N IoU block), then the
  greedy order inside the tile is resolved by iterating keep_i = cand_i & !any_{j<i}(keep_j &
  iou_ji > t) to its fixed point (unique, and equal to the greedy result; a few iterations in
  practice, at most T): about N / T sequential steps instead of one per box.

  Args and returns: as nms_indices.
  """
  n = boxes.shape[0]
  max_output = int(max_output)
  tile = int(min(tile, n))
  num_tiles = -(-n // tile)
  pad = num_tiles * tile - n
  order = jnp.argsort(-scores, stable=True).astype(jnp.int32)
  # Four (N + pad,) coordinate vectors rather than one (N + pad, 4) array: lane-dense on TPU, and
  # libtpu crashed compiling for v5p the fusion of padding an (N, 4) array and slicing a column.
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


def greedy_nms(
  boxes: Array, scores: Array, classes: Optional[Array], iou_threshold: float, max_output: int
) -> tuple[Array, Array]:
  """Greedy NMS in one while_loop step per box sorted by score (torchvision's CPU kernel).

  Each box that survives suppresses, in one vectorised step, every box overlapping it by more
  than the threshold. IoU rows are computed only for kept boxes and the loop stops once
  `max_output` boxes are kept or padding is reached: about kept * N IoUs, never N x N.

  Args and returns: as nms_indices.
  """
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

  state = (
    jnp.int32(0),
    jnp.int32(0),
    jnp.zeros((n,), bool),
    jnp.full((max_output,), -1, jnp.int32),
  )
  _, count, _, keep = jax.lax.while_loop(cond, body, state)
  return keep, count


def nms_indices(
  boxes: Array, scores: Array, classes: Optional[Array], iou_threshold: float, max_output: int
) -> tuple[Array, Array]:
  """Greedy NMS of boxes (N, 4) float32 xyxy, scores (N,) float32 (-inf: padding, never kept).

  With classes (N,) a box suppresses only boxes of its class. Returns the kept indices
  (max_output,) int32 in decreasing score order, padded with -1, and their number (int32).
  """
  return choose_form(
    greedy_nms,
    tiled_nms,
    boxes,
    scores,
    classes,
    iou_threshold=iou_threshold,
    max_output=max_output,
  )
