"""Every XLA:CPU form against its reference form (values and gradients), and the choice of form.

Both forms run here on CPU, called by name; the public functions' agreement with torch is tested
in tests/models/test_layers.py, tests/ops/test_roi_align.py and tests/ops/test_nms.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rethink_jax.ops import onednn
from rethink_jax.ops import xla_cpu
from tests.ops._util import random_boxes


def _vjp_both(cpu_form, reference_form, args, rng, argnums, tol):
  """Asserts that both forms give the same output and the same vjp (random cotangent), jitted.

  Returns the reference form's output and gradients (of the arguments numbered argnums).
  """

  def value_and_grads(form, cot):
    def f(*diff):
      return form(*(diff[argnums.index(i)] if i in argnums else a for i, a in enumerate(args)))

    y, vjp = jax.vjp(f, *(args[i] for i in argnums))
    return y, vjp(cot)

  out = jax.eval_shape(reference_form, *args)
  cot = jnp.asarray(rng.normal(size=out.shape), out.dtype)
  y_cpu, g_cpu = jax.jit(functools.partial(value_and_grads, cpu_form))(cot)
  y_ref, g_ref = jax.jit(functools.partial(value_and_grads, reference_form))(cot)
  for a, b in zip((y_cpu, *g_cpu), (y_ref, *g_ref)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
    )
  return y_ref, g_ref


@pytest.mark.parametrize(
  "k,s,p,d,g",
  [
    (1, 1, 0, 1, 1),  # 1x1: the 2D matmul
    (1, 2, 0, 1, 1),  # 1x1 stride 2 (a shortcut): subsampled, then the matmul
    (3, 1, 1, 1, 1),  # stride 1, padding < k: gradients as forward convs
    (3, 1, 0, 1, 1),
    (3, 1, 2, 1, 1),  # padding k - 1 (a "full" correlation)
    (5, 1, 2, 1, 1),
    (3, 2, 1, 1, 1),  # stride 2: the reference conv on both
    (3, 1, 2, 2, 2),  # dilation and groups: the grouped form (kernel gradient per tap)
    (3, 1, 1, 1, 4),  # a ResNeXt 3x3: groups of 2 channels
    (3, 2, 1, 1, 4),  # ... with the stage's stride
    (3, 2, 2, 2, 8),  # depthwise, strided and dilated
  ],
)
@pytest.mark.parametrize("with_onednn", [True, False])
def test_conv2d_forms_agree(rng, monkeypatch, k, s, p, d, g, with_onednn):
  """conv2d_cpu with oneDNN's custom calls, and with the XLA forms it falls back to."""
  if not with_onednn:
    monkeypatch.setattr(onednn, "available", lambda: False)
  x = jnp.asarray(rng.normal(size=(2, 9, 11, 8)), jnp.float32)
  cout = 6 if 6 % g == 0 else 8
  kernel = jnp.asarray(rng.normal(size=(k, k, 8 // g, cout)) / k, jnp.float32)
  spec = xla_cpu.ConvSpec((s, s), (p, p), (d, d), g)
  with jax.default_matmul_precision("highest"):
    _vjp_both(
      functools.partial(xla_cpu.conv2d_cpu, spec=spec),
      functools.partial(xla_cpu.conv2d_reference, spec=spec),
      (x, kernel),
      rng,
      (0, 1),
      1e-4,
    )


def test_conv2d_cpu_stride1_gradient_inside_cond(rng):
  """The mask head runs convs in conditionals: the custom VJP there, against the reference."""
  x = jnp.asarray(rng.normal(size=(3, 7, 6, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 8, 4)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(3, 7, 6, 4)), jnp.float32)

  def loss(form, x, kernel, taken):
    y = jax.lax.cond(
      taken, lambda: form(x, kernel, xla_cpu.ConvSpec((1, 1), (1, 1))), lambda: jnp.zeros_like(cot)
    )
    return jnp.sum(y * cot)

  with jax.default_matmul_precision("highest"):
    grads = [
      jax.jit(jax.grad(functools.partial(loss, form), (0, 1)))(x, kernel, True)
      for form in (xla_cpu.conv2d_cpu, xla_cpu.conv2d_reference)
    ]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "shape,groups,dtype",
  [
    ((2, 16, 8, 64), 32, jnp.float32),  # H divisible by 8: 8 slabs of 2 rows
    ((2, 12, 5, 24), 8, jnp.float32),  # H = 12: 6 slabs
    ((1, 7, 9, 32), 4, jnp.float32),  # H prime: 7 slabs of one row
    ((2, 8, 4, 32), 32, jnp.bfloat16),  # bfloat16 activations, float32 statistics
  ],
)
def test_group_norm_forms_agree(rng, shape, groups, dtype):
  x = jnp.asarray(rng.normal(size=shape) * 2.0 + rng.normal(), dtype)
  c = shape[-1]
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  bias = jnp.asarray(rng.uniform(-0.5, 0.5, c), jnp.float32)
  ref = functools.partial(xla_cpu.group_norm_reference, num_groups=groups, epsilon=1e-5)
  tol = 1e-4 if dtype == jnp.float32 else 5e-2
  for fast in (xla_cpu.group_norm_cpu, xla_cpu.group_norm_tpu):
    fast = functools.partial(fast, num_groups=groups, epsilon=1e-5)
    y, _ = _vjp_both(fast, ref, (x, scale, bias), rng, (0, 1, 2), tol)
  # The reference itself normalizes: zero mean, unit variance per (image, group) before the affine.
  if dtype == jnp.float32:
    z = ((y - bias) / scale).reshape(shape[0], -1, groups, c // groups)
    np.testing.assert_allclose(z.mean(axis=(1, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.var(axis=(1, 3)), 1.0, atol=1e-3)


@pytest.mark.parametrize("shape", [(3, 5, 7, 16), (64, 4)])
def test_add_bias_forms_agree(rng, shape):
  y = jnp.asarray(rng.normal(size=shape), jnp.float32)
  bias = jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32)
  _, (dy, dbias) = _vjp_both(
    xla_cpu.add_bias_cpu, xla_cpu.add_bias_reference, (y, bias), rng, (0, 1), 1e-5
  )
  assert dbias.shape == bias.shape and dy.shape == y.shape


@pytest.mark.parametrize("window,stride,padding", [(3, 2, 1), (1, 2, 0), (2, 2, 0), (3, 1, 1)])
def test_max_pool_forms_agree_with_ties(rng, window, stride, padding):
  x = np.maximum(rng.normal(size=(2, 11, 12, 3)), 0)  # after ReLU: windows of equal zeros
  x = jnp.asarray(np.round(x * 2) / 2, jnp.float32)  # and ties between positive values
  static = dict(window=window, stride=stride, padding=padding)
  _vjp_both(
    functools.partial(xla_cpu.max_pool_cpu, **static),
    functools.partial(xla_cpu.max_pool_reference, **static),
    (x,),
    rng,
    (0,),
    1e-6,
  )


def _weighted_rows_case(rng, batch=2, s=40, c=5, r=6, k=16):
  flat = jnp.asarray(rng.normal(size=(batch, s, c)), jnp.float32)
  index = rng.integers(0, s, size=(batch, r, 3, 4, k)).astype(np.int32)
  index[:, 0, 0, 0, :] = 7  # all taps on one row: repeated indices accumulate
  weight = jnp.asarray(rng.uniform(0, 1, size=(batch, r, 3, 4, k, 1)), jnp.float32)
  return flat, jnp.asarray(index), weight


def test_weighted_rows_forms_agree_vmapped(rng):
  """RoIAlign's sums, vmapped over images as roi_align does: values and the gradient of flat."""
  flat, index, weight = _weighted_rows_case(rng)
  _vjp_both(
    jax.vmap(xla_cpu.weighted_rows_cpu),
    jax.vmap(xla_cpu.weighted_rows_reference),
    (flat, index, weight),
    rng,
    (0,),
    1e-5,
  )
  # And against the sum written out with a materialised gather.
  dense = jnp.sum(jax.vmap(lambda f, i: f[i])(flat, index) * weight, axis=-2)
  np.testing.assert_allclose(
    jax.vmap(xla_cpu.weighted_rows_reference)(flat, index, weight), dense, rtol=1e-5, atol=1e-5
  )


def test_public_forms_under_grad_vmap_and_cond(rng):
  """The public functions (custom VJPs chosen inside platform_dependent) in a cond, vmapped."""
  flat, index, weight = _weighted_rows_case(rng, c=8)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32)
  bias = jnp.asarray(rng.normal(size=8), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 8, 8)), jnp.float32)

  def head(rows, gn, conv, add, pool, flat, scale, bias, kernel):
    y = jax.vmap(rows)(flat, index, weight).reshape(-1, 3, 4, 8)  # (B * R, 3, 4, C)
    y = gn(y, scale, bias)
    y = add(conv(y, kernel), bias)
    return jnp.sum(jnp.square(pool(y)))

  def loss(forms, taken, *args):
    return jax.lax.cond(taken, lambda: head(*forms, *args), lambda: 0.0)

  public = (
    xla_cpu.weighted_rows,
    lambda y, s, b: xla_cpu.group_norm(y, s, b, 4, 1e-5),
    lambda y, k: xla_cpu.conv2d(y, k, strides=(1, 1), padding=(1, 1)),
    xla_cpu.add_bias,
    lambda y: xla_cpu.max_pool(y, 3, 2, 1),
  )
  reference = (
    xla_cpu.weighted_rows_reference,
    lambda y, s, b: xla_cpu.group_norm_reference(y, s, b, 4, 1e-5),
    lambda y, k: xla_cpu.conv2d_reference(y, k, xla_cpu.ConvSpec((1, 1), (1, 1))),
    xla_cpu.add_bias_reference,
    lambda y: xla_cpu.max_pool_reference(y, 3, 2, 1),
  )
  args = (flat, scale, bias, kernel)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(jax.value_and_grad(functools.partial(loss, public), (1, 2, 3, 4)))(True, *args)
    want = jax.jit(jax.value_and_grad(functools.partial(loss, reference), (1, 2, 3, 4)))(
      True, *args
    )
  # A gradient entry is a sum of terms as large as the biggest entries, so a small one that
  # cancels keeps their float32 rounding: absolute error is held to ~17 eps of the leaf's scale.
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("with_classes", [False, True])
@pytest.mark.parametrize("thr,max_out", [(0.7, 100), (0.4, 500)])
def test_nms_forms_agree(rng, with_classes, thr, max_out):
  batch, n = 3, 300
  boxes = random_boxes(rng, batch * n, size=100.0, min_wh=2.0, max_wh=40.0).reshape(batch, n, 4)
  scores = rng.permutation(batch * n).reshape(batch, n).astype(np.float32)  # no ties
  scores[1, rng.random(n) < 0.3] = -np.inf  # padding
  scores[2, :] = -np.inf
  scores[2, :4] = 1.0 + np.arange(4)
  boxes[2, :4] = 20.0 * np.arange(4)[:, None] + np.array([0.0, 0.0, 10.0, 10.0])  # disjoint: 4 kept
  classes = rng.integers(0, 4, (batch, n)).astype(np.int32) if with_classes else None
  args = (jnp.asarray(boxes), jnp.asarray(scores), classes)
  greedy = jax.jit(jax.vmap(lambda b, s, c: xla_cpu.greedy_nms(b, s, c, thr, max_out)))(*args)
  tiled = jax.jit(jax.vmap(lambda b, s, c: xla_cpu.tiled_nms(b, s, c, thr, max_out, tile=64)))(
    *args
  )
  np.testing.assert_array_equal(greedy[1], tiled[1])
  np.testing.assert_array_equal(greedy[0], tiled[0])
  assert 0 < int(greedy[1][0]) <= max_out and int(greedy[1][2]) == 4


def _lowered(f, *args, platform=None):
  traced = jax.jit(f).trace(*args)
  return (traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()).as_text()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_choose_form_keeps_the_form_of_the_platform_lowered_for(platform):
  f = lambda x: xla_cpu.choose_form(jnp.sin, jnp.cos, x)
  x = jnp.ones((3,), jnp.float32)
  off_cpu, on_cpu = _lowered(f, x, platform=platform), _lowered(f, x)
  assert "stablehlo.cosine" in off_cpu and "stablehlo.sine" not in off_cpu
  assert "stablehlo.sine" in on_cpu and "stablehlo.cosine" not in on_cpu
  np.testing.assert_allclose(jax.jit(f)(x), np.sin(1.0) * np.ones(3), rtol=1e-6)


def test_choose_form_passes_static_arguments():
  f = lambda x: xla_cpu.choose_form(lambda x, *, n: x + n, lambda x, *, n: x - n, x, n=2.0)
  np.testing.assert_allclose(jax.jit(f)(jnp.ones(2)), 3.0)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_public_functions_lower_to_the_reference_form_off_cpu(rng, platform):
  """Marks of the CPU forms: optimization_barrier (column sums), no select_and_scatter."""
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 32)), jnp.float32)
  scale, bias = jnp.ones((32,)), jnp.zeros((32,))
  kernel = jnp.asarray(rng.normal(size=(3, 3, 32, 32)), jnp.float32)

  def loss(x, scale, bias, kernel):
    y = xla_cpu.group_norm(x, scale, bias, 8, 1e-5)
    y = xla_cpu.add_bias(xla_cpu.conv2d(y, kernel, strides=(1, 1), padding=(1, 1)), bias)
    return jnp.sum(xla_cpu.max_pool(y, 3, 2, 1))

  grad = jax.grad(loss, (0, 1, 2, 3))
  off_cpu = _lowered(grad, x, scale, bias, kernel, platform=platform)
  on_cpu = _lowered(grad, x, scale, bias, kernel)
  assert "optimization_barrier" not in off_cpu and "select_and_scatter" in off_cpu
  assert "optimization_barrier" in on_cpu and "select_and_scatter" not in on_cpu


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_tpu_forms_are_lowered_for_tpu_only(rng, platform):
  """On TPU a 1x1 conv is a dot_general; on other platforms off CPU a convolution."""
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 32)), jnp.float32)
  scale, bias = jnp.ones((32,)), jnp.zeros((32,))
  kernel = jnp.asarray(rng.normal(size=(1, 1, 32, 16)), jnp.float32)

  def loss(x, scale, bias, kernel):
    y = xla_cpu.group_norm(x, scale, bias, 8, 1e-5)
    return jnp.sum(xla_cpu.conv2d(y, kernel, strides=(2, 2), padding=(0, 0)) ** 2)

  text = _lowered(jax.grad(loss, (0, 1, 2, 3)), x, scale, bias, kernel, platform=platform)
  has_conv = "stablehlo.convolution" in text
  assert has_conv == (platform != "tpu")
  assert ("stablehlo.dot_general" in text) == (platform == "tpu")


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_conv2d_tpu_form_agrees(rng, strides):
  x = jnp.asarray(rng.normal(size=(2, 9, 7, 12)), jnp.float32)
  for kernel_shape, padding in (((1, 1, 12, 8), (0, 0)), ((3, 3, 12, 8), (1, 1))):
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    spec = xla_cpu.ConvSpec(strides, padding)
    _vjp_both(
      functools.partial(xla_cpu.conv2d_tpu, spec=spec),
      functools.partial(xla_cpu.conv2d_reference, spec=spec),
      (x, kernel),
      rng,
      (0, 1),
      1e-4,
    )
