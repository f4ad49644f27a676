"""Conv2d, norms and max-pool against torch.nn (fresh random inputs each run)."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rethink_jax.models import layers
from rethink_jax.models.layers import Conv2d
from rethink_jax.models.layers import build_norm
from rethink_jax.ops import xla_cpu

SEED = int(time.time() * 1000) % 2**31
print("test_layers seed", SEED)


@pytest.fixture
def rng():
  return np.random.default_rng(SEED)


def get_norm(norm, **kwargs):
  """A norm module as Conv2d builds it from build_norm's factory."""
  return build_norm(norm, **kwargs)()


GN = build_norm("GN", num_groups=32)


def to_nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def to_nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
  "k,s,p,d,g,bias",
  [
    (3, 2, 1, 1, 1, True),  # stride 2: symmetric padding (Flax 'SAME' would differ)
    (7, 2, 3, 1, 1, False),  # the stem
    (1, 2, 0, 1, 1, False),  # 1x1 stride 2 shortcut (the matmul path)
    (1, 1, 0, 1, 1, True),  # 1x1 (matmul path) with bias
    (3, 1, 2, 2, 2, True),  # dilation and groups
  ],
)
def test_conv2d_matches_torch(rng, k, s, p, d, g, bias):
  x = rng.normal(size=(2, 11, 13, 8)).astype(np.float32)
  tconv = torch.nn.Conv2d(8, 6, k, stride=s, padding=p, dilation=d, groups=g, bias=bias)
  conv = Conv2d(6, k, strides=s, padding=p, dilation=d, groups=g, use_bias=bias)
  params = {"kernel": tconv.weight.detach().numpy().transpose(2, 3, 1, 0)}
  if bias:
    params["bias"] = tconv.bias.detach().numpy()
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: this is a parity check
    y = conv.apply({"params": params}, x)
  ref = to_nhwc(tconv(to_nchw(x)))
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,s", [(1, 1), (3, 1), (3, 2)])
def test_conv2d_with_bias_gradients_match_torch(rng, k, s):
  """All three gradients of a biased conv (the bias one is xla_cpu.add_bias's column sum)."""
  x = rng.normal(size=(2, 9, 10, 8)).astype(np.float32)
  tconv = torch.nn.Conv2d(8, 6, k, stride=s, padding=k // 2)
  tx = to_nchw(x).requires_grad_(True)
  ty = tconv(tx)
  dy = rng.normal(size=ty.shape).astype(np.float32)
  ty.backward(torch.from_numpy(dy))
  conv = Conv2d(6, k, strides=s, padding=k // 2, use_bias=True)
  params = {
    "kernel": tconv.weight.detach().numpy().transpose(2, 3, 1, 0),
    "bias": tconv.bias.detach().numpy(),
  }
  loss = lambda p, x: jnp.sum(conv.apply({"params": p}, x) * dy.transpose(0, 2, 3, 1))
  with jax.default_matmul_precision("highest"):
    dp, dx = jax.jit(jax.grad(loss, (0, 1)))(params, x)
  np.testing.assert_allclose(dx, to_nhwc(tx.grad), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    dp["kernel"], tconv.weight.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(dp["bias"], tconv.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,p", [(3, 1), (3, 0), (5, 2), (3, 2)])
def test_conv2d_stride1_gradients_match_torch(rng, k, p):
  """Stride-1 convs (on CPU xla_cpu.conv2d_cpu's custom VJP): output and gradients, in a cond."""
  x = rng.normal(size=(3, 10, 12, 8)).astype(np.float32)
  tconv = torch.nn.Conv2d(8, 6, k, padding=p, bias=False)
  tx = to_nchw(x).requires_grad_(True)
  ty = tconv(tx)
  dy = rng.normal(size=ty.shape).astype(np.float32)
  ty.backward(torch.from_numpy(dy))
  conv = Conv2d(6, k, padding=p, use_bias=False)
  kernel = tconv.weight.detach().numpy().transpose(2, 3, 1, 0)

  def loss(x, kernel, taken):
    y = jax.lax.cond(
      taken,
      lambda: conv.apply({"params": {"kernel": kernel}}, x),
      lambda: jnp.zeros((3,) + dy.shape[2:] + (6,)),
    )
    return jnp.sum(y * dy.transpose(0, 2, 3, 1)), y

  with jax.default_matmul_precision("highest"):
    (_, y), (dx, dk) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, kernel, True)
  np.testing.assert_allclose(y, to_nhwc(ty), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, to_nhwc(tx.grad), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    dk, tconv.weight.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-4
  )


def test_conv2d_params_and_init(rng):
  conv = Conv2d(64, 3, norm=GN)
  v = conv.init(jax.random.key(SEED, impl="rbg"), jnp.zeros((1, 8, 8, 32)))
  assert set(v["params"]) == {"kernel", "norm"}  # no bias when normed
  assert (
    v["params"]["kernel"].shape == (3, 3, 32, 64) and v["params"]["kernel"].dtype == jnp.float32
  )
  # MSRA fill: kaiming normal, fan_out = 3*3*64, std sqrt(2 / fan_out).
  std = float(np.std(v["params"]["kernel"]))
  assert abs(std / np.sqrt(2 / (9 * 64)) - 1) < 0.05
  assert set(
    Conv2d(8, 1).init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 4, 4, 3)))["params"]
  ) == {"kernel", "bias"}
  with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
    conv.init(jax.random.key(0, impl="rbg"), jnp.zeros((3, 8, 8)))


def test_conv2d_bfloat16_keeps_float32_params(rng):
  x = rng.normal(size=(2, 9, 9, 16)).astype(np.float32)
  v = Conv2d(32, 3, norm=GN).init(jax.random.key(SEED, impl="rbg"), x)
  y32 = Conv2d(32, 3, norm=GN).apply(v, x)
  conv16 = Conv2d(32, 3, norm=GN, dtype=jnp.bfloat16)
  v16 = conv16.init(jax.random.key(SEED, impl="rbg"), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(v16))
  y16 = conv16.apply(v, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.1, rtol=0.05)


def test_group_norm_eps_and_torch(rng):
  gn = get_norm("GN", num_groups=32)
  assert gn.epsilon == 1e-5 and gn.num_groups == 32
  # Small-variance groups make the epsilon matter: 1e-6 (Flax's default) would differ.
  x = (rng.normal(size=(2, 5, 6, 64)) * 3e-3).astype(np.float32)
  tgn = torch.nn.GroupNorm(32, 64, eps=1e-5)
  with torch.no_grad():
    tgn.weight.uniform_(0.5, 1.5)
    tgn.bias.uniform_(-0.5, 0.5)
  v = {"params": {"scale": tgn.weight.detach().numpy(), "bias": tgn.bias.detach().numpy()}}
  y = gn.apply(v, x)
  ref = to_nhwc(tgn(to_nchw(x)))
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  tgn6 = torch.nn.GroupNorm(32, 64, eps=1e-6)
  tgn6.load_state_dict(tgn.state_dict())
  assert np.abs(to_nhwc(tgn6(to_nchw(x))) - y).max() > 1e-2


@pytest.mark.parametrize(
  "shape,groups",
  [
    ((2, 6, 5, 64), 32),
    ((3, 4, 7, 24), 8),
    ((2, 16, 3, 32), 8),  # H = 16: the CPU group sums add 8 slabs of 2 rows
  ],
)
def test_group_norm_gradients_match_torch(rng, shape, groups):
  """The written-out VJP of group_norm vs torch's autograd: d/dx, d/dscale, d/dbias."""
  x = (rng.normal(size=shape) * 2.0 + rng.normal()).astype(np.float32)
  dy = rng.normal(size=shape).astype(np.float32)
  c = shape[-1]
  scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
  bias = rng.uniform(-0.5, 0.5, c).astype(np.float32)
  y, vjp = jax.vjp(lambda x, s, b: xla_cpu.group_norm(x, s, b, groups, 1e-5), x, scale, bias)
  dx, dscale, dbias = vjp(jnp.asarray(dy))

  tgn = torch.nn.GroupNorm(groups, c, eps=1e-5)
  with torch.no_grad():
    tgn.weight.copy_(torch.from_numpy(scale))
    tgn.bias.copy_(torch.from_numpy(bias))
  tx = to_nchw(x).requires_grad_(True)
  ty = tgn(tx)
  ty.backward(to_nchw(dy))
  np.testing.assert_allclose(y, to_nhwc(ty), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, to_nhwc(tx.grad), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dscale, tgn.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dbias, tgn.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_group_norm_tiny_width_uses_fewer_groups(rng):
  x = rng.normal(size=(2, 4, 4, 16)).astype(np.float32)
  v = get_norm("GN", num_groups=32).init(jax.random.key(0, impl="rbg"), x)
  ref = to_nhwc(torch.nn.GroupNorm(16, 16)(to_nchw(x)))  # gcd(32, 16) groups
  np.testing.assert_allclose(get_norm("GN", num_groups=32).apply(v, x), ref, rtol=1e-4, atol=1e-4)


def test_frozen_bn_is_an_affine(rng):
  x = rng.normal(size=(3, 4, 5, 8)).astype(np.float32)
  fbn = get_norm("FrozenBN")
  v = fbn.init(jax.random.key(0, impl="rbg"), x)
  assert set(v) == {"frozen"}  # nothing in "params": no optimizer sees it
  scale, bias = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
  y = fbn.apply({"frozen": {"scale": scale, "bias": bias}}, x, True)
  np.testing.assert_allclose(y, x * scale + bias, rtol=1e-6, atol=1e-6)
  y2, state = fbn.apply(
    {"frozen": {"scale": scale, "bias": bias}}, x, True, mutable=["batch_stats", "frozen"]
  )
  np.testing.assert_array_equal(state["frozen"]["scale"], scale)  # train=True changes nothing
  np.testing.assert_allclose(y2, y)


@pytest.mark.parametrize("group_size", [None, 2])
def test_batch_norm_train_matches_torch(rng, group_size):
  x = rng.normal(loc=1.0, scale=2.0, size=(4, 5, 6, 8)).astype(np.float32)
  bn = get_norm("BN", bn_group_size=group_size)
  v = bn.init(jax.random.key(0, impl="rbg"), x)
  scale, bias = rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.normal(size=8).astype(np.float32)
  v = {"params": {"scale": scale, "bias": bias}, "batch_stats": v["batch_stats"]}
  y, state = bn.apply(v, x, True, mutable=["batch_stats"])
  g = group_size or x.shape[0]
  refs, means, vars_ = [], [], []
  for i in range(0, x.shape[0], g):
    tbn = torch.nn.BatchNorm2d(8, eps=1e-5, momentum=0.1).train()
    with torch.no_grad():
      tbn.weight.copy_(torch.from_numpy(scale))
      tbn.bias.copy_(torch.from_numpy(bias))
    refs.append(to_nhwc(tbn(to_nchw(x[i : i + g]))))
    means.append(tbn.running_mean.numpy())
    vars_.append(tbn.running_var.numpy())
  np.testing.assert_allclose(y, np.concatenate(refs), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(state["batch_stats"]["mean"], np.mean(means, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"], np.mean(vars_, 0), rtol=1e-5, atol=1e-5)
  # Eval uses the running statistics.
  v["batch_stats"] = state["batch_stats"]
  y_eval = bn.apply(v, x, False)
  ref_eval = (x - state["batch_stats"]["mean"]) / np.sqrt(state["batch_stats"]["var"] + 1e-5)
  np.testing.assert_allclose(y_eval, ref_eval * scale + bias, rtol=1e-4, atol=1e-4)


def test_sync_bn_is_whole_batch_and_bad_group_raises(rng):
  x = rng.normal(size=(4, 3, 3, 4)).astype(np.float32)
  sbn = get_norm("SyncBN")
  v = sbn.init(jax.random.key(0, impl="rbg"), x)
  y, _ = sbn.apply(v, x, True, mutable=["batch_stats"])
  ref = (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="group_size=3"):
    get_norm("BN", bn_group_size=3).apply(v, x, True, mutable=["batch_stats"])


def test_build_norm_names():
  assert build_norm(None) is None and build_norm("") is None
  with pytest.raises(ValueError, match="LayerNorm"):
    build_norm("LayerNorm")
  with pytest.raises(ValueError, match="num_groups"):
    build_norm("GN")
  assert isinstance(get_norm("SyncBN", axis_name="data"), layers.BatchNorm)
  assert get_norm("SyncBN", axis_name="data").axis_name == "data"
  assert get_norm("BN", bn_group_size=0).group_size is None  # 0: the whole batch
  assert get_norm("BN", bn_group_size=4, axis_name="data").axis_name is None


def test_max_pool_matches_torch_with_negative_inputs(rng):
  # All-negative inputs: zero padding would leak 0 into border windows; -inf padding must not.
  x = -np.abs(rng.normal(size=(2, 9, 10, 3))).astype(np.float32) - 1
  y = xla_cpu.max_pool(jnp.asarray(x), 3, 2, 1)
  ref = to_nhwc(torch.nn.functional.max_pool2d(to_nchw(x), 3, 2, 1))
  np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("window,stride,padding", [(3, 2, 1), (1, 2, 0), (2, 2, 0)])
def test_max_pool_gradient_matches_torch_with_ties(rng, window, stride, padding):
  """Each window's gradient goes to its first maximum (row-major), as in torch, ties included."""
  x = np.maximum(rng.normal(size=(2, 11, 12, 3)), 0)  # after ReLU: windows of equal zeros
  x = (np.round(x * 2) / 2).astype(np.float32)  # and ties between positive values
  tx = to_nchw(x).requires_grad_(True)
  ty = torch.nn.functional.max_pool2d(tx, window, stride, padding)
  dy = rng.normal(size=ty.shape).astype(np.float32)
  ty.backward(torch.from_numpy(dy))
  pool = lambda x: xla_cpu.max_pool(x, window, stride, padding)
  y, vjp = jax.vjp(pool, jnp.asarray(x))
  np.testing.assert_array_equal(y, to_nhwc(ty))
  np.testing.assert_allclose(
    vjp(jnp.asarray(dy.transpose(0, 2, 3, 1)))[0], to_nhwc(tx.grad), rtol=1e-6, atol=1e-6
  )
