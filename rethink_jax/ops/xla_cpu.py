"""Forms of the model's ops that XLA:CPU runs faster (conv, GroupNorm, bias, max-pool gradients).

Moved out of models/layers.py; each is to sit beside its plain reference form, chosen at lowering.
"""
import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _group_sums(a: Array, unroll: int = 8) -> Array:
  """(B, H, W, G, C/G) -> (B, 1, 1, G, 1) float32 sums over H, W and C/G.

  On CPU the first step adds `unroll` slabs of rows elementwise (H split as (unroll, H / unroll)),
  and only the (B, H / unroll, W, G, C/G) sum is a reduction: XLA:CPU reduces the full array per
  (image, group) slowly, e.g. 15.4 -> 1.8 ms for (2, 256, 256, 32, 2). Same sums, another order.
  Elsewhere one reduction (on TPU the slabs took 2.3 GiB more temporaries: 11.21 vs 8.89 GiB for
  the v5e train step at 2 x 1024 x 1024 per chip, scripts/tpu_compile.py).
  """
  def by_slabs(a):
    h = a.shape[1]
    k = max(d for d in range(1, min(unroll, h) + 1) if h % d == 0)
    slabs = a.reshape(a.shape[0], k, h // k, *a.shape[2:])
    partial = slabs[:, 0]
    for i in range(1, k):
      partial = partial + slabs[:, i]
    return jnp.sum(partial, axis=(1, 2, 4), keepdims=True)

  return jax.lax.platform_dependent(
      a, cpu=by_slabs, default=lambda a: jnp.sum(a, axis=(1, 2, 4), keepdims=True))


def _column_sums(a: Array) -> Array:
  """(N, C) -> (C,) float32 sums over N.

  On CPU as a product with a row of ones: XLA:CPU emits the reduction (which it folds back into
  the activation's (B, H, W, C) shape) as strided window reductions, e.g. 49 ms for
  (2, 128, 128, 256), while the product reads the rows in order. The barrier keeps XLA from
  rewriting the product back into that reduction. Elsewhere a plain sum (a float32 product would
  run at reduced precision on TPU / TF32 GPUs).
  """
  def as_product(a):
    ones = jax.lax.optimization_barrier(jnp.ones((1, a.shape[0]), a.dtype))
    return (ones @ a)[0]

  return jax.lax.platform_dependent(a, cpu=as_product, default=lambda a: jnp.sum(a, axis=0))


@jax.custom_vjp
def add_bias(y: Array, bias: Array) -> Array:
  """y (..., C) + bias (C,); the bias gradient is one column sum over all the other axes (on CPU a
  vector-matrix product, see `_column_sums`; XLA:CPU reduced a deconv's (64, 28, 28, 256) gradient
  per channel in 50-100 ms as window reductions)."""
  return y + bias


def _add_bias_fwd(y, bias):
  return add_bias(y, bias), None


def _add_bias_bwd(_, g):
  return g, _column_sums(g.reshape(-1, g.shape[-1]).astype(jnp.float32)).astype(g.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float) -> Array:
  """torch.nn.GroupNorm on NHWC: x (B, H, W, C), scale and bias (C,) -> (B, H, W, C) in x.dtype.

  Statistics and arithmetic in float32. The gradient is written out (custom VJP) so that every
  reduction over the activations runs in the (B, H, W, G, C/G) layout, which XLA:CPU reduces
  quickly, and the parameter gradients as one (B*H*W, C) column sum each, where autodiff sums per
  (image, channel) over (H, W). R50-FPN-GN forward + backward at 512 x 512, batch 2, on 2 cores:
  4.73-4.80 s with autodiff's gradient, 4.31-4.53 s with this one (two runs each).
  """
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
  b, h, w, c = x.shape
  xg = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
  # Two-pass statistics (E[x^2] - E[x]^2 cancels badly in float32), (B, 1, 1, G, 1) each.
  n = h * w * (c // num_groups)
  mean = _group_sums(xg) / n
  inv = jax.lax.rsqrt(_group_sums(jnp.square(xg - mean)) / n + epsilon)
  # One per-(image, channel) affine over x: y = x * a + shift.
  a = inv * scale.reshape(num_groups, c // num_groups)  # (B, 1, 1, G, C/G)
  shift = bias.reshape(num_groups, c // num_groups) - mean * a
  y = x.astype(jnp.float32) * a.reshape(b, 1, 1, c) + shift.reshape(b, 1, 1, c)
  return y.astype(x.dtype), (x, scale, mean, inv)


def _group_norm_bwd(num_groups, epsilon, res, dy):
  """dx = inv * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = dy * scale."""
  del epsilon
  x, scale, mean, inv = res
  b, h, w, c = x.shape
  n = h * w * (c // num_groups)
  xg = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
  dyg = dy.astype(jnp.float32).reshape(xg.shape)
  xhat = (xg - mean) * inv
  dxhat = dyg * scale.reshape(num_groups, c // num_groups)
  mean_dxhat = _group_sums(dxhat) / n
  mean_dxhat_xhat = _group_sums(dxhat * xhat) / n
  dx = inv * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
  dscale = _column_sums((dyg * xhat).reshape(-1, c))
  dbias = _column_sums(dyg.reshape(-1, c))
  return dx.reshape(x.shape).astype(x.dtype), dscale, dbias


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def _conv_nhwc(x: Array, kernel: Array, padding: tuple[int, int]) -> Array:
  ph, pw = padding
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((ph, ph), (pw, pw)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_stride1(x: Array, kernel: Array, padding: tuple[int, int]) -> Array:
  """Stride-1 conv x (B, H, W, I) * kernel (kh, kw, I, O) -> (B, H', W', O), padding <= k - 1.

  On CPU its gradients are written as forward (NHWC x HWIO) convolutions: XLA:CPU runs the
  convolutions that autodiff emits for a conv's gradients slowly inside a conditional (a 3 x 3 conv
  on 64 x 14 x 14 x 256, kernel gradient in a lax.cond: 41.8 s, against 0.06 s in this form), and
  the mask branch runs in conditionals (roi_heads.StandardROIHeads._mask_logits). Elsewhere
  (chosen when lowering, so also for TPU programs compiled ahead of time on a CPU host) they are
  autodiff's.
  """
  return _conv_nhwc(x, kernel, padding)


def _conv_stride1_fwd(x, kernel, padding):
  return _conv_nhwc(x, kernel, padding), (x, kernel)


def _conv_grads_as_forward_convs(x, kernel, dy, padding):
  kh, kw = kernel.shape[:2]
  ph, pw = padding
  # Input gradient: dy correlated with the spatially flipped kernel, in/out channels swapped.
  dx = _conv_nhwc(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), (kh - 1 - ph, kw - 1 - pw))
  # Kernel gradient: channels act as the batch and images as input channels; dy is the kernel.
  dk = _conv_nhwc(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), padding)
  return dx, dk.transpose(1, 2, 0, 3)


def _conv_grads_autodiff(x, kernel, dy, padding):
  return jax.vjp(lambda a, b: _conv_nhwc(a, b, padding), x, kernel)[1](dy)


def _conv_stride1_bwd(padding, residuals, dy):
  x, kernel = residuals
  return jax.lax.platform_dependent(
      x, kernel, dy, cpu=functools.partial(_conv_grads_as_forward_convs, padding=padding),
      default=functools.partial(_conv_grads_autodiff, padding=padding))


conv_stride1.defvjp(_conv_stride1_fwd, _conv_stride1_bwd)


def conv2d(x: Array, kernel: Array, *, strides: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int] = (1, 1), groups: int = 1) -> Array:
  """x (B, H, W, I) * kernel (kh, kw, I / groups, O) -> (B, H', W', O), symmetric padding."""
  kh, kw = kernel.shape[:2]
  (sh, sw), (ph, pw), (dh, dw) = strides, padding, dilation
  if ((kh, kw, ph, pw, dh, dw, groups) == (1, 1, 0, 0, 1, 1, 1)
      and jax.default_backend() == "cpu"):
    # A 1x1 conv is a matmul; XLA:CPU runs its backward much faster as dot_general. (Not on
    # GPU: there f32 dots default to TF32 where cuDNN convs do not, and cuDNN is fast anyway.)
    # As a 2D (B*H*W, I) @ (I, O) product: through einsum's 4D form XLA:CPU writes the
    # incoming gradient (e.g. a GroupNorm's dx) transposed for the kernel gradient, a strided
    # copy that made the 1x1 conv + GN + ReLU backward 1.4-1.7x slower.
    x = x[:, ::sh, ::sw, :]
    return (x.reshape(-1, x.shape[-1]) @ kernel[0, 0]).reshape(*x.shape[:3], kernel.shape[-1])
  if (sh, sw, dh, dw, groups) == (1, 1, 1, 1, 1) and ph < kh and pw < kw:
    return conv_stride1(x, kernel, (ph, pw))
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(sh, sw), padding=((ph, ph), (pw, pw)),
      rhs_dilation=(dh, dw), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: Array, window: int = 3, stride: int = 2, padding: int = 1) -> Array:
  """PyTorch max_pool2d: x (B, H, W, C) -> (B, H', W', C), symmetric -inf padding.

  The gradient goes to the first maximum of each window in row-major order (PyTorch's and XLA's
  rule), written as one strided comparison per window tap: autodiff's select-and-scatter runs on
  XLA:CPU as a scatter, 112 ms against 40 ms here for the stem's (2, 256, 256, 64).
  """
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1),
      ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _max_pool_fwd(x, window, stride, padding):
  y = max_pool(x, window, stride, padding)
  return y, (x, y)


def _max_pool_bwd(window, stride, padding, res, g):
  x, y = res
  _, h, w, _ = x.shape
  _, oh, ow, _ = y.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
               constant_values=-jnp.inf)
  span_h, span_w = stride * (oh - 1) + 1, stride * (ow - 1) + 1
  zero = jnp.zeros((), g.dtype)
  taken = jnp.zeros(y.shape, bool)  # the window's maximum was found at an earlier tap
  dxp = jnp.zeros(xp.shape, g.dtype)
  for i in range(window):
    for j in range(window):
      hit = (xp[:, i:i + span_h:stride, j:j + span_w:stride] == y) & ~taken
      taken = taken | hit
      # Place tap (i, j)'s gradients at their input positions: interior padding = stride - 1.
      dxp = dxp + jax.lax.pad(jnp.where(hit, g, zero), zero, (
          (0, 0, 0), (i, xp.shape[1] - i - span_h, stride - 1),
          (j, xp.shape[2] - j - span_w, stride - 1), (0, 0, 0)))
  return (dxp[:, padding:padding + h, padding:padding + w],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
