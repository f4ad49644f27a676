"""FPN against torchvision.ops.FeaturePyramidNetwork (GroupNorm, LastLevelMaxPool) on a R50-GN."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from rethink_jax import convert
from rethink_jax.models import FPN
from rethink_jax.models import build_resnet
from rethink_jax.models import build_resnet_fpn
from rethink_jax.models import layers
from rethink_jax.models.fpn import upsample_nearest

SEED = int(time.time() * 1000) % 2**31
print("test_fpn seed", SEED)
R50_FPN_GN_PARAMS = 26_854_464  # REFERENCE.md: torchvision R50-GN (no fc) + FPN-GN, P2..P6


def gn(c):
  return torch.nn.GroupNorm(32, c)


def torch_r50_fpn_gn():
  body = torchvision.models.resnet50(norm_layer=gn)
  fpn = FeaturePyramidNetwork(
    [256, 512, 1024, 2048], 256, extra_blocks=LastLevelMaxPool(), norm_layer=gn
  )
  return body, fpn


def test_param_count_r50_gn_fpn_gn():
  model = build_resnet_fpn(depth=50, norm="GN", fpn_norm="GN")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
  with torch.device("meta"):
    body, fpn = torch_r50_fpn_gn()
  n_tv = sum(p.numel() for k, p in body.named_parameters() if not k.startswith("fc.")) + sum(
    p.numel() for p in fpn.parameters()
  )
  print(f"R50-GN + FPN-GN params: {n:,} (torchvision: {n_tv:,})")
  assert n == n_tv == R50_FPN_GN_PARAMS
  p = shapes["params"]
  assert set(p) == {"bottom_up"} | {
    f"fpn_{t}{i}" for t in ("lateral", "output") for i in range(2, 6)
  }
  assert set(p["fpn_lateral2"]) == {"kernel", "norm"}  # no conv bias when normed
  assert p["fpn_lateral5"]["kernel"].shape == (1, 1, 2048, 256)
  assert p["fpn_output3"]["kernel"].shape == (3, 3, 256, 256)


def test_fpn_without_norm_has_biases_and_shapes():
  model = FPN(
    bottom_up=build_resnet(depth=18, norm="GN", width=8),
    in_features=("res2", "res3", "res4", "res5"),
    out_channels=16,
    conv=layers.conv_def(norm=None, dtype=jnp.float32),
  )
  out, v = jax.eval_shape(
    lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, 96, 64, 3)))
  )
  assert set(v["params"]["fpn_output4"]) == {"kernel", "bias"}
  assert {k: o.shape for k, o in out.items()} == {
    "p2": (2, 24, 16, 16),
    "p3": (2, 12, 8, 16),
    "p4": (2, 6, 4, 16),
    "p5": (2, 3, 2, 16),
    "p6": (2, 2, 1, 16),
  }
  # The plain-values builder: fpn_norm "" is no norm, the other fields come from the config.
  built = build_resnet_fpn(depth=18, norm="GN", width=8, out_channels=16, fpn_norm="")
  v2 = jax.eval_shape(lambda: built.init(jax.random.key(0), jnp.zeros((2, 96, 64, 3))))
  assert jax.tree_util.tree_structure(v2) == jax.tree_util.tree_structure(v)


def test_upsample_nearest_matches_torch():
  x = np.random.default_rng(SEED).normal(size=(1, 3, 5, 2)).astype(np.float32)
  for hw in [(6, 10), (5, 9), (7, 11)]:
    ref = (
      torch.nn.functional.interpolate(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), size=hw, mode="nearest"
      )
      .numpy()
      .transpose(0, 2, 3, 1)
    )
    np.testing.assert_array_equal(upsample_nearest(jnp.asarray(x), hw), ref)


def params_of_torch_fpn_gn(body, fpn) -> dict:
  """Our ResNet-FPN params of torchvision's GN ResNet body and GN FeaturePyramidNetwork."""
  sd = {k: v.detach().numpy() for k, v in body.state_dict().items()}
  d2, origin, _, left = convert._rename_torch(sd)  # pylint: disable=protected-access
  assert not left, left
  bottom_up, _, _ = convert.d2_to_variables(d2, origin, "GN", "GN")
  params = {"bottom_up": bottom_up["params"]}
  fsd = {k: v.detach().numpy() for k, v in fpn.state_dict().items()}
  for i in range(4):
    for tv, ours in (("inner_blocks", "fpn_lateral"), ("layer_blocks", "fpn_output")):
      params[f"{ours}{i + 2}"] = {
        "kernel": fsd[f"{tv}.{i}.0.weight"].transpose(2, 3, 1, 0),
        "norm": {"scale": fsd[f"{tv}.{i}.1.weight"], "bias": fsd[f"{tv}.{i}.1.bias"]},
      }
  return params


def test_fpn_gn_matches_torchvision():
  torch.manual_seed(SEED)
  body, fpn = torch_r50_fpn_gn()
  with torch.no_grad():  # random GN affines so that scale/bias mix-ups show
    for m in list(body.modules()) + list(fpn.modules()):
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  body.eval()
  fpn.eval()

  params = params_of_torch_fpn_gn(body, fpn)

  # 80 x 72: res5 is 3 x 3 under a 5 x 5 res4, so the top-down path is not an exact 2x there.
  x = np.random.default_rng(SEED).normal(size=(2, 80, 72, 3)).astype(np.float32)
  model = build_resnet_fpn(depth=50, norm="GN", fpn_norm="GN")
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: this is a parity check
    out = jax.jit(model.apply)({"params": params}, x)

  with torch.no_grad():
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    t = body.maxpool(body.relu(body.bn1(body.conv1(t))))
    feats = {}
    for i in range(1, 5):
      t = getattr(body, f"layer{i}")(t)
      feats[f"p{i + 1}"] = t
    ref = fpn(feats)
  ref = {("p6" if k == "pool" else k): v.numpy().transpose(0, 2, 3, 1) for k, v in ref.items()}
  assert sorted(out) == sorted(ref) == ["p2", "p3", "p4", "p5", "p6"]
  for k in ref:
    assert out[k].shape == ref[k].shape, (k, out[k].shape, ref[k].shape)
    err = float(np.max(np.abs(np.asarray(out[k]) - ref[k])) / np.max(np.abs(ref[k])))
    assert err < 1e-4, f"{k}: relative error {err:.2e}"
