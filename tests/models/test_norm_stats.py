"""GroupNorm statistics over the padded tensor ("padded") or each image's region ("valid"),
against torch: GroupNorm alone, and a GN ResNet-18 + GN FPN (torchvision) at stage and FPN level."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from rethink_jax.models import build_resnet
from rethink_jax.models import build_resnet_fpn
from rethink_jax.models import layers
from tests.models import test_fpn

SEED = int(time.time() * 1000) % 2**31
print("test_norm_stats seed", SEED)


def to_torch(x_nhwc):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2)))


def to_nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def padded_batch(rng, sizes, pad_hw, channels):
  """Random images of `sizes` [(h, w)] at the top-left of zeros (B, H, W, C); the crops."""
  x = np.zeros((len(sizes), *pad_hw, channels), np.float32)
  crops = []
  for i, (h, w) in enumerate(sizes):
    crops.append(rng.normal(size=(1, h, w, channels)).astype(np.float32))
    x[i, :h, :w] = crops[-1][0]
  return x, crops


def test_group_norm_valid_matches_torch_on_the_crop():
  """Forward and gradients: the valid region equals torch GroupNorm of the unpadded image, the
  rest is 0; a padding image (0 x 0) gives zeros, not NaN."""
  rng = np.random.default_rng(SEED)
  sizes = [(9, 13), (16, 5), (0, 0)]
  x, crops = padded_batch(rng, sizes, (16, 16), 12)
  hw = np.asarray(sizes, np.int32)
  scale = rng.uniform(0.5, 1.5, 12).astype(np.float32)
  bias = rng.uniform(-0.5, 0.5, 12).astype(np.float32)
  dy = rng.normal(size=x.shape).astype(np.float32)
  loss = lambda x, s, b: jnp.sum(layers.group_norm_valid(x, s, b, hw, 4, 1e-5) * dy)
  y = layers.group_norm_valid(x, scale, bias, hw, 4, 1e-5)
  dx, ds, db = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
  assert np.all(np.isfinite(np.asarray(dx)))
  ts, tb = torch.tensor(scale, requires_grad=True), torch.tensor(bias, requires_grad=True)
  ds_ref, db_ref = np.zeros_like(scale), np.zeros_like(bias)
  for i, (h, w) in enumerate(sizes):
    outside = np.ones(x.shape[1:3], bool)
    outside[:h, :w] = False
    assert np.all(np.asarray(y[i])[outside] == 0)
    assert np.all(np.asarray(dx[i])[outside] == 0)
    if h == 0:
      continue
    tx = to_torch(crops[i]).requires_grad_(True)
    ty = torch.nn.functional.group_norm(tx, 4, ts, tb, 1e-5)
    (ty * to_torch(dy[i : i + 1, :h, :w])).sum().backward()
    np.testing.assert_allclose(np.asarray(y[i, :h, :w]), to_nhwc(ty)[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx[i, :h, :w]), to_nhwc(tx.grad)[0], atol=1e-4)
    ds_ref, db_ref = ts.grad.numpy().copy(), tb.grad.numpy().copy()
  np.testing.assert_allclose(np.asarray(ds), ds_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(db), db_ref, rtol=1e-4, atol=1e-4)


def test_group_norm_padded_is_torch_on_the_padded_tensor():
  rng = np.random.default_rng(SEED + 1)
  x, _ = padded_batch(rng, [(9, 13), (16, 5)], (16, 16), 12)
  norm = layers.build_norm("GN", num_groups=4)()
  params = {"params": {"scale": rng.uniform(0.5, 1.5, 12), "bias": rng.uniform(-0.5, 0.5, 12)}}
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
  got = norm.apply(params, x)
  ref = torch.nn.functional.group_norm(
    to_torch(x), 4, torch.tensor(params["params"]["scale"]), torch.tensor(params["params"]["bias"])
  )
  np.testing.assert_allclose(np.asarray(got), to_nhwc(ref), atol=1e-5)


def test_valid_needs_group_norm():
  with pytest.raises(ValueError, match="GN"):
    build_resnet(depth=18, norm="FrozenBN", norm_stats="valid")
  with pytest.raises(ValueError, match="norm_stats"):
    build_resnet(depth=18, norm="GN", norm_stats="crop")
  with pytest.raises(ValueError, match="GN"):
    build_resnet_fpn(depth=18, norm="GN", fpn_norm="", norm_stats="valid")


def gn(c):
  return torch.nn.GroupNorm(32, c)


@pytest.fixture(scope="module")
def torch_r18_fpn_gn():
  """torchvision ResNet-18-GN body + GN FPN with random affines, and the same as JAX params."""
  torch.manual_seed(SEED)
  body = torchvision.models.resnet18(norm_layer=gn).eval()
  fpn = FeaturePyramidNetwork(
    [64, 128, 256, 512], 256, extra_blocks=LastLevelMaxPool(), norm_layer=gn
  ).eval()
  with torch.no_grad():  # random GN affines so that the bias fills the padding in "padded"
    for m in list(body.modules()) + list(fpn.modules()):
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  params = test_fpn.params_of_torch_fpn_gn(body, fpn)
  return body, fpn, params


def torch_levels(body, fpn, x_nhwc):
  """{"res2".."res5", "p2".."p6"} (NHWC numpy) of torchvision's body + FPN."""
  with torch.no_grad():
    t = body.maxpool(body.relu(body.bn1(body.conv1(to_torch(x_nhwc)))))
    feats = {}
    for i in range(1, 5):
      t = getattr(body, f"layer{i}")(t)
      feats[f"res{i + 1}"] = t
    pyramid = fpn({f"p{k[-1]}": v for k, v in feats.items()})
  out = {k: to_nhwc(v) for k, v in feats.items()}
  out.update({("p6" if k == "pool" else k): to_nhwc(v) for k, v in pyramid.items()})
  return out


def jax_levels(params, norm_stats, x, image_hw):
  model = build_resnet_fpn(depth=18, norm="GN", fpn_norm="GN", norm_stats=norm_stats)
  with jax.default_matmul_precision("highest"):
    out, state = jax.jit(
      lambda x, hw: model.apply({"params": params}, x, False, hw, capture_intermediates=True)
    )(x, image_hw)
  stages = state["intermediates"]["bottom_up"]["__call__"][0]
  return jax.tree_util.tree_map(np.asarray, {**stages, **out})


STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32, "p2": 4, "p3": 8, "p4": 16, "p5": 32}
STRIDES["p6"] = 64


def max_rel_err(got, ref):
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


# Sizes not multiples of 32: the valid region ends inside a stride-32 cell at every level.
SIZES = [(72, 100), (100, 52)]


def test_padded_stats_equal_torch_on_the_padded_tensor(torch_r18_fpn_gn):
  body, fpn, params = torch_r18_fpn_gn
  x, _ = padded_batch(np.random.default_rng(SEED + 2), SIZES, (128, 128), 3)
  got = jax_levels(params, "padded", x, np.asarray(SIZES, np.int32))
  ref = torch_levels(body, fpn, x)
  assert sorted(got) == sorted(ref) == sorted(STRIDES)
  for k in ref:
    assert got[k].shape == ref[k].shape, (k, got[k].shape, ref[k].shape)
    assert max_rel_err(got[k], ref[k]) < 1e-4, k


def test_valid_stats_equal_torch_on_the_unpadded_image(torch_r18_fpn_gn):
  """Every stage and FPN level: the valid region equals torch on the crop (the whole image
  unpadded); stage outputs are 0 outside it."""
  body, fpn, params = torch_r18_fpn_gn
  x, crops = padded_batch(np.random.default_rng(SEED + 3), SIZES, (128, 128), 3)
  got = jax_levels(params, "valid", x, np.asarray(SIZES, np.int32))
  worst = 0.0
  for i, (h, w) in enumerate(SIZES):
    ref = torch_levels(body, fpn, crops[i])
    for k, s in STRIDES.items():
      vh, vw = -(-h // s), -(-w // s)
      assert ref[k].shape[1:3] == (vh, vw), (k, ref[k].shape)
      err = max_rel_err(got[k][i, :vh, :vw], ref[k][0])
      worst = max(worst, err)
      assert err < 1e-4, (k, i, err)
      if k.startswith("res"):
        assert np.all(got[k][i, vh:] == 0) and np.all(got[k][i, :, vw:] == 0), k
  print("valid vs torch on the crop: worst relative error", worst)


@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_valid_stats_bottleneck_equal_the_unpadded_image(stride_in_1x1):
  """Bottleneck blocks (R-50, narrow): "valid" on the padded batch equals the same model on each
  unpadded image, where "padded" is torch's GroupNorm (test_fpn.py, against torchvision)."""
  x, crops = padded_batch(np.random.default_rng(SEED + 4), SIZES, (128, 128), 3)
  hw = np.asarray(SIZES, np.int32)
  kw = dict(depth=50, norm="GN", width=8, num_groups=4, stride_in_1x1=stride_in_1x1)
  valid = build_resnet(norm_stats="valid", **kw)
  variables = valid.init(jax.random.PRNGKey(SEED % 1000), x[:1])
  got = jax.jit(lambda x, hw: valid.apply(variables, x, False, hw))(x, hw)
  padded = jax.jit(build_resnet(**kw).apply)
  for i, (h, w) in enumerate(SIZES):
    ref = padded(variables, crops[i])
    for k, r in ref.items():
      s = STRIDES[k]
      a = np.asarray(got[k][i, : -(-h // s), : -(-w // s)])
      assert max_rel_err(a, np.asarray(r[0])) < 1e-4, (k, i)
