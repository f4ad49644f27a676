"""Converter parity: every source format against its own framework, on random weights."""

import copy
import json
import os
import pickle
import re
import time

import jax
import numpy as np
import pytest
import timm
import torch
import torchvision

from rethink_jax import convert
from rethink_jax import files
from rethink_jax.models import build_resnet
from tests.test_safe_pickle import python2_numpy1_pickle

SEED = int(time.time() * 1000) % 2**31
print("test_convert seed", SEED)
HW = 64


# ------------------------------------------------------------------------------------ helpers


def randomize_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Random BN statistics and affines, random GN affines: folding mistakes cannot hide."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
        c = m.weight.shape[0]
        m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        m.bias.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
        if isinstance(m, torch.nn.BatchNorm2d):
          m.running_mean.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
          m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
  return model.eval()


def torch_stages(model, x_nchw: np.ndarray) -> dict:
  """torchvision / timm ResNet stage outputs layer1..layer4 as NHWC res2..res5."""
  act = getattr(model, "act1", None) or model.relu
  with torch.no_grad():
    t = model.maxpool(act(model.bn1(model.conv1(torch.from_numpy(x_nchw)))))
    out = {}
    for i in range(1, 5):
      t = getattr(model, f"layer{i}")(t)
      out[f"res{i + 1}"] = t.numpy().transpose(0, 2, 3, 1)
  return out


def jax_stages(variables, meta, x_nhwc: np.ndarray) -> dict:
  model = build_resnet(
    depth=meta["depth"],
    norm=meta["norm"],
    stride_in_1x1=meta["stride_in_1x1"],
    groups=meta["groups"],
    width_per_group=meta["width_per_group"],
  )
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: this is a parity check
    return {k: np.asarray(v) for k, v in model.apply(variables, x_nhwc, train=False).items()}


def assert_rel_close(got: dict, ref: dict, tol: float = 1e-4):
  assert sorted(got) == sorted(ref) == ["res2", "res3", "res4", "res5"]
  for k in ref:
    assert got[k].shape == ref[k].shape, (k, got[k].shape, ref[k].shape)
    err = float(np.max(np.abs(got[k] - ref[k])) / np.max(np.abs(ref[k])))
    assert err < tol, f"{k}: relative error {err:.2e} (seed {SEED})"


def random_image(seed_offset=0) -> np.ndarray:
  return np.random.default_rng(SEED + seed_offset).normal(size=(1, HW, HW, 3)).astype(np.float32)


def check_parity(path, source, model, **kw):
  variables, meta = convert.convert_backbone(str(path), source, **kw)
  x = random_image()
  assert_rel_close(jax_stages(variables, meta, x), torch_stages(model, x.transpose(0, 3, 1, 2)))
  return variables, meta


def check_same_conversion(variables, meta, path, source, **kw):
  """Another file of the same weights (other protocol or writer) converts to the same result."""
  got, got_meta = convert.convert_backbone(str(path), source, **kw)
  flatten = convert._flatten  # pylint: disable=protected-access
  want_flat, got_flat = flatten(variables), flatten(got)
  assert sorted(got_flat) == sorted(want_flat)
  for k, v in want_flat.items():
    assert got_flat[k].dtype == v.dtype, k
    np.testing.assert_array_equal(got_flat[k], v, err_msg=str(k))
  ignore = ("sha256", "input")
  assert {k: v for k, v in got_meta.items() if k not in ignore} == {
    k: v for k, v in meta.items() if k not in ignore
  }


def save_pth(model, path):
  torch.save(model.state_dict(), path)
  return path


def assert_nothing_written(out_dir):
  parent = os.path.dirname(out_dir)
  assert not os.path.exists(out_dir)
  base = os.path.basename(out_dir)
  assert not [p for p in os.listdir(parent) if p.startswith(base)], os.listdir(parent)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def tv_r50(tmp):
  torch.manual_seed(SEED)
  model = randomize_norms(torchvision.models.resnet50(), SEED)
  return model, save_pth(model, tmp / "tv_r50.pth")


@pytest.fixture(scope="module")
def timm_gn(tmp):
  torch.manual_seed(SEED + 1)
  return randomize_norms(timm.create_model("resnet50_gn", pretrained=False), SEED + 1)


# ------------------------------------------------------------------------------------ parity


def test_torchvision_resnet50_frozen_bn_and_cli_roundtrip(tv_r50, tmp, capsys):
  model, path = tv_r50
  variables, meta = check_parity(path, "torchvision", model)
  assert meta["norm"] == "FrozenBN" and meta["stride_in_1x1"] is False
  assert meta["input_format"] == "RGB" and meta["pixel_std"] == convert.RGB_STD
  assert set(variables) == {"params", "frozen"}
  for k in convert.META_KEYS:
    assert k in meta

  out = str(tmp / "tv_r50_out")
  assert convert.main(["--source", "torchvision", "--input", str(path), "--output", out]) == 0
  printed = capsys.readouterr().out
  assert "used    layer4.2.conv3.weight (2048, 512, 1, 1) -> params/res5/2/conv3/kernel" in printed
  assert "dropped fc.weight (1000, 2048)" in printed
  loaded, meta2 = convert.load_backbone(out)
  assert meta2["sha256"] == convert.sha256_file(str(path)) and meta2["depth"] == 50
  for a, b in zip(_leaves(loaded), _leaves(variables)):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(out, "meta.json")) as f:
    assert json.load(f)["source"] == "torchvision"
  # An existing output is refused without --overwrite, replaced with it.
  assert convert.main(["--source", "torchvision", "--input", str(path), "--output", out]) == 1
  assert (
    convert.main(["--source", "torchvision", "--input", str(path), "--output", out, "--overwrite"])
    == 0
  )
  assert sorted(p for p in os.listdir(tmp) if p.startswith("tv_r50_out")) == ["tv_r50_out"]


def _leaves(tree):
  if isinstance(tree, dict):
    return [x for k in sorted(tree) for x in _leaves(tree[k])]
  return [tree]


def test_torchvision_resnet101_frozen_bn(tmp):
  torch.manual_seed(SEED + 2)
  model = randomize_norms(torchvision.models.resnet101(), SEED + 2)
  path = save_pth(model, tmp / "tv_r101.pth")
  _, meta = check_parity(path, "torchvision", model, depth=101)
  assert meta["depth"] == 101


def test_torchvision_resnet50_as_sync_bn(tv_r50):
  model, path = tv_r50
  variables, meta = check_parity(path, "torchvision", model, norm="SyncBN")
  assert meta["norm"] == "SyncBN" and set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_resnet50_gn(timm_gn, tmp, fmt):
  path = tmp / f"timm_r50_gn.{fmt}"
  if fmt == "safetensors":
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

    save_file({k: v.contiguous() for k, v in timm_gn.state_dict().items()}, str(path))
  else:
    save_pth(timm_gn, path)
  variables, meta = check_parity(path, "timm", timm_gn)
  assert meta["norm"] == "GN" and meta["stride_in_1x1"] is False and "frozen" not in variables


def test_timm_resnet50_bn(tmp):
  torch.manual_seed(SEED + 3)
  model = randomize_norms(timm.create_model("resnet50", pretrained=False), SEED + 3)
  path = save_pth(model, tmp / "timm_r50.pth")
  _, meta = check_parity(path, "timm", model)
  assert meta["norm"] == "FrozenBN"


# ------------------------------------------------------------------------------ Caffe2 Detectron


def caffe2_blobs(model: torch.nn.Module, gn: bool) -> dict:
  """Detectron's Caffe2 naming for a torchvision-layout ResNet; BN folded to *_bn_s/_bn_b
  (MSRA) or GN as *_gn_s/_gn_b (FAIR); conv1 reads BGR 0..255 minus the mean (std folded in)."""
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  blobs = {}

  def norm(src, dst, stem=False):
    if gn:
      blobs[f"{dst}_gn_s"], blobs[f"{dst}_gn_b"] = sd[f"{src}.weight"], sd[f"{src}.bias"]
    else:
      s = sd[f"{src}.weight"] / np.sqrt(sd[f"{src}.running_var"] + 1e-5)
      name = "res_conv1" if stem else dst
      blobs[f"{name}_bn_s"] = s
      blobs[f"{name}_bn_b"] = sd[f"{src}.bias"] - sd[f"{src}.running_mean"] * s

  std = np.asarray(convert.RGB_STD, np.float32)
  blobs["conv1_w"] = np.ascontiguousarray((sd["conv1.weight"] / std[None, :, None, None])[:, ::-1])
  norm("bn1", "conv1", stem=True)
  for i in range(1, 5):
    j = 0
    while f"layer{i}.{j}.conv1.weight" in sd:
      pre, dst = f"layer{i}.{j}", f"res{i + 1}_{j}"
      for c, br in ((1, "branch2a"), (2, "branch2b"), (3, "branch2c")):
        blobs[f"{dst}_{br}_w"] = sd[f"{pre}.conv{c}.weight"]
        norm(f"{pre}.bn{c}", f"{dst}_{br}")
      if f"{pre}.downsample.0.weight" in sd:
        blobs[f"{dst}_branch1_w"] = sd[f"{pre}.downsample.0.weight"]
        norm(f"{pre}.downsample.1", f"{dst}_branch1")
      j += 1
  fc = "pred" if gn else "fc1000"
  blobs[f"{fc}_w"], blobs[f"{fc}_b"] = sd["fc.weight"], sd["fc.bias"]
  blobs["conv1_w_momentum"] = np.zeros_like(blobs["conv1_w"])  # optimizer state: dropped
  return blobs


def check_bgr_parity(variables, meta, model):
  x_rgb = np.random.default_rng(SEED).uniform(0, 255, size=(1, HW, HW, 3)).astype(np.float32)
  x_torch = (x_rgb - np.float32(convert.RGB_MEAN)) / np.float32(convert.RGB_STD)
  assert meta["input_format"] == "BGR"
  x_ours = (x_rgb[..., ::-1] - np.float32(meta["pixel_mean"])) / np.float32(meta["pixel_std"])
  assert_rel_close(
    jax_stages(variables, meta, x_ours),
    torch_stages(model, np.ascontiguousarray(x_torch.transpose(0, 3, 1, 2))),
  )


def test_detectron_msra_bn_pickle(tv_r50, tmp):
  model = copy.deepcopy(tv_r50[0])
  for i in (2, 3, 4):  # MSRA: the stride in the first 1x1 conv
    block = getattr(model, f"layer{i}")[0]
    block.conv1.stride, block.conv2.stride = (2, 2), (1, 1)
  path = tmp / "R-50.pkl"
  with open(path, "wb") as f:
    pickle.dump({"blobs": caffe2_blobs(model, gn=False)}, f)
  variables, meta = convert.convert_backbone(str(path), "detectron")
  assert meta["stride_in_1x1"] is True and meta["norm"] == "FrozenBN"
  assert meta["pixel_std"] == [1.0, 1.0, 1.0] and meta["pixel_mean"] == convert.BGR_MEAN
  assert "fc1000_w" in meta["dropped"] and "conv1_w_momentum" in meta["dropped"]
  check_bgr_parity(variables, meta, model)
  # The same blobs as Python 3 protocol 2 (bytes via _codecs.encode) and as Python 2 + NumPy 1.x
  # wrote them (numpy.core.multiarray._reconstruct, byte strings read with latin1).
  p2 = tmp / "R-50-protocol2.pkl"
  with open(p2, "wb") as f:
    pickle.dump({"blobs": caffe2_blobs(model, gn=False)}, f, protocol=2)
  check_same_conversion(variables, meta, p2, "detectron")
  py2 = tmp / "R-50-py2.pkl"
  py2.write_bytes(python2_numpy1_pickle({"blobs": caffe2_blobs(model, gn=False)}))
  check_same_conversion(variables, meta, py2, "detectron")


def test_detectron_fair_gn_pickle(timm_gn, tmp):
  path = tmp / "R-50-GN.pkl"
  with open(path, "wb") as f:
    pickle.dump(caffe2_blobs(timm_gn, gn=True), f)  # a plain dict this time
  variables, meta = convert.convert_backbone(str(path), "detectron")
  assert meta["stride_in_1x1"] is False and meta["norm"] == "GN"
  check_bgr_parity(variables, meta, timm_gn)
  py2 = tmp / "R-50-GN-py2.pkl"
  py2.write_bytes(python2_numpy1_pickle(caffe2_blobs(timm_gn, gn=True)))
  check_same_conversion(variables, meta, py2, "detectron")


def test_detectron2_checkpoint(tv_r50, tmp):
  model, _ = tv_r50
  d2 = {}
  for k, v in model.state_dict().items():
    if k.startswith("fc.") or k.endswith("num_batches_tracked"):
      continue  # Detectron2's FrozenBatchNorm2d has no counter
    k = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", k)
    k = re.sub(r"^conv1\.", "stem.conv1.", k)
    k = re.sub(r"^bn1\.", "stem.conv1.norm.", k)
    k = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", k)
    k = k.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    d2["backbone.bottom_up." + k] = v.numpy()
  d2["backbone.fpn_lateral2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
  d2["proposal_generator.rpn_head.conv.weight"] = np.zeros((256, 256, 3, 3), np.float32)
  d2["pixel_mean"] = np.float32(convert.RGB_MEAN).reshape(3, 1, 1)
  d2["pixel_std"] = np.float32(convert.RGB_STD).reshape(3, 1, 1)
  path = tmp / "model_final.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": d2, "__author__": "test"}, f)
  variables, meta = convert.convert_backbone(
    str(path), "detectron2", stride_in_1x1=False, input_format="RGB"
  )
  assert "backbone.fpn_lateral2.weight" in meta["dropped"]
  assert meta["pixel_std"] == pytest.approx(convert.RGB_STD) and meta["input_format"] == "RGB"
  x = random_image(1)
  assert_rel_close(jax_stages(variables, meta, x), torch_stages(model, x.transpose(0, 3, 1, 2)))
  for protocol in (2, 5):
    other = tmp / f"model_final_protocol{protocol}.pkl"
    with open(other, "wb") as f:
      pickle.dump({"model": d2, "__author__": "test"}, f, protocol=protocol)
    check_same_conversion(
      variables, meta, other, "detectron2", stride_in_1x1=False, input_format="RGB"
    )


# ------------------------------------------------------------------------------------ ResNeXt


@pytest.fixture(scope="module")
def tv_x101(tmp):
  torch.manual_seed(SEED + 4)
  model = randomize_norms(torchvision.models.resnext101_32x8d(), SEED + 4)
  return model, save_pth(model, tmp / "tv_x101_32x8d.pth")


@pytest.fixture(scope="module")
def timm_x50(tmp):
  """timm's resnext50_32x4d (random weights) as safetensors."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  torch.manual_seed(SEED + 5)
  model = randomize_norms(timm.create_model("resnext50_32x4d", pretrained=False), SEED + 5)
  path = tmp / "timm_x50_32x4d.safetensors"
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
  return model, path


def test_torchvision_resnext101_32x8d(tv_x101):
  model, path = tv_x101
  variables, meta = check_parity(path, "torchvision", model, depth=101)
  assert (meta["depth"], meta["groups"], meta["width_per_group"]) == (101, 32, 8)
  assert meta["norm"] == "FrozenBN" and meta["stride_in_1x1"] is False
  assert variables["params"]["res2"]["0"]["conv2"]["kernel"].shape == (3, 3, 8, 256)
  assert "layer3.22.conv2.weight (1024, 32, 3, 3) -> params/res4/22/conv2/kernel" in meta["used"]


def test_detectron2_resnext_checkpoint_has_the_stride_in_the_3x3(tv_x101, tmp):
  """Detectron2 model files do not record STRIDE_IN_1X1; its ResNeXt configs all set False."""
  model, path = tv_x101
  d2 = {}
  for k, v in model.state_dict().items():
    if k.startswith("fc.") or k.endswith("num_batches_tracked"):
      continue  # FrozenBatchNorm2d: no counter, as a fine-tuned Detectron2 model
    k = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", k)
    k = re.sub(r"^(conv1|bn1)\.", lambda m: "stem.conv1." + ("norm." if m[1] == "bn1" else ""), k)
    k = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", k)
    k = k.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    d2["backbone.bottom_up." + k] = v.numpy()
  d2_path = tmp / "x101_model_final.pkl"
  with open(d2_path, "wb") as f:
    pickle.dump({"model": d2, "__author__": "test"}, f)
  got, meta = convert.convert_backbone(str(d2_path), "detectron2", input_format="RGB")
  assert meta["stride_in_1x1"] is False and (meta["groups"], meta["width_per_group"]) == (32, 8)
  want, _ = convert.convert_backbone(str(path), "torchvision")
  flatten = convert._flatten  # pylint: disable=protected-access
  assert sorted(flatten(got)) == sorted(flatten(want))
  for k, v in flatten(want).items():
    np.testing.assert_array_equal(flatten(got)[k], v, err_msg=str(k))


def test_timm_resnext50_safetensors(timm_x50):
  model, path = timm_x50
  _, meta = check_parity(path, "timm", model)
  assert (meta["depth"], meta["groups"], meta["width_per_group"]) == (50, 32, 4)


def test_detectron2_resnext_pickle_unfolded_bn_and_std(tv_x101, tmp):
  """Detectron2's ImageNetPretrained/FAIR/X-101-32x8d.pkl layout: Caffe2 blob names with BN kept
  (*_bn_gamma, _beta, _running_mean, _running_var), BGR conv1, inputs divided by the BGR std
  (its configs: PIXEL_STD [57.375, 57.120, 58.395], STRIDE_IN_1X1 False)."""
  model, _ = tv_x101
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  blobs = {}
  for k, v in sd.items():
    if k.endswith("num_batches_tracked"):
      continue
    leaf = {"weight": "gamma", "bias": "beta"}.get(k.rsplit(".", 1)[1], k.rsplit(".", 1)[1])
    if k == "conv1.weight":
      blobs["conv1_w"] = np.ascontiguousarray(v[:, ::-1])  # BGR input channels, std not folded
    elif k.startswith("bn1."):
      blobs[f"res_conv1_bn_{leaf}"] = v
    elif k.startswith("fc."):
      blobs[f"pred_{k[3]}"] = v
    else:
      m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn|downsample\.)(\d)\.(\w+)", k)
      stage, block, kind, i = int(m[1]) + 1, m[2], m[3], int(m[4])
      branch = "branch1" if kind == "downsample." else "branch2" + "abc"[i - 1]
      is_norm = kind == "bn" or (kind == "downsample." and i == 1)
      blobs[f"res{stage}_{block}_{branch}_" + (f"bn_{leaf}" if is_norm else "w")] = v
  path = tmp / "X-101-32x8d.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": blobs, "__author__": "FAIR", "matching_heuristics": True}, f)
  variables, meta = convert.convert_backbone(str(path), "detectron")
  assert meta["stride_in_1x1"] is False and meta["norm"] == "FrozenBN"
  assert meta["pixel_std"] == convert.BGR_STD and meta["pixel_mean"] == convert.BGR_MEAN
  assert (meta["groups"], meta["width_per_group"], meta["source_norm"]) == (32, 8, "BN")
  assert "pred_w" in meta["dropped"]
  check_bgr_parity(variables, meta, model)
  bn, bn_meta = convert.convert_backbone(str(path), "detectron", norm="BN")
  assert bn_meta["norm"] == "BN" and set(bn) == {"params", "batch_stats"}
  check_bgr_parity(bn, bn_meta, model)


def test_detectron_resnext_pickle_folded_bn_and_std(tv_x101, tmp):
  """Detectron's X-152-32x8d-IN5k.pkl layout (here at depth 101: the layout does not depend on
  depth, and X-152's shapes are checked in tests/models/test_resnet.py): BN folded into
  *_bn_s / _bn_b, BGR conv1 with the std folded in, stride in the 3x3 conv (STRIDE_IN_1X1
  False, "a C2 model"), inputs minus the mean only (Detectron2's default PIXEL_STD 1), and
  zero conv biases *_b as some Caffe2 files have."""
  model, _ = tv_x101
  blobs = caffe2_blobs(model, gn=False)
  for name in [k for k in blobs if re.fullmatch(r"(conv1|res\d_\d+_branch\w+)_w", k)]:
    blobs[name[: -len("w")] + "b"] = np.zeros(blobs[name].shape[0], np.float32)  # Caffe2's
  path = tmp / "X-101-32x8d-folded.pkl"
  with open(path, "wb") as f:
    pickle.dump({"blobs": blobs}, f, protocol=2)
  variables, meta = convert.convert_backbone(str(path), "detectron")
  assert "res4_22_branch2b_b" in meta["dropped"] and "conv1_b" in meta["dropped"]
  assert meta["stride_in_1x1"] is False and meta["source_norm"] == "affine"
  assert meta["pixel_std"] == [1.0, 1.0, 1.0] and meta["pixel_mean"] == convert.BGR_MEAN
  assert (meta["depth"], meta["groups"], meta["width_per_group"]) == (101, 32, 8)
  check_bgr_parity(variables, meta, model)


# ------------------------------------------------------------------------------------ bad input


def run_cli_expect_failure(capsys, out, *args):
  rc = convert.main(list(args) + ["--output", out])
  err = capsys.readouterr().err
  assert rc == 1, err
  assert_nothing_written(out)
  return err


def test_bad_inputs_fail_clearly_and_write_nothing(tv_r50, tmp, capsys):
  _, good = tv_r50
  out = str(tmp / "bad_out")

  truncated = tmp / "truncated.pth"
  truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
  err = run_cli_expect_failure(capsys, out, "--source", "torchvision", "--input", str(truncated))
  assert "Cannot read" in err and "truncated.pth" in err

  truncated_st = tmp / "truncated.safetensors"
  truncated_st.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": ')
  err = run_cli_expect_failure(capsys, out, "--source", "timm", "--input", str(truncated_st))
  assert "Cannot read" in err

  other = save_pth(torchvision.models.mobilenet_v3_small(), tmp / "mobilenet.pth")
  err = run_cli_expect_failure(capsys, out, "--source", "torchvision", "--input", str(other))
  assert "another architecture" in err and "features.0.0.weight" in err

  sd = torch.load(good, weights_only=True)
  sd["layer1.0.conv2.weight"] = torch.zeros(64, 64, 5, 5)  # e.g. a variant with 5x5 convs
  wrong = tmp / "wrong_shape.pth"
  torch.save(sd, wrong)
  err = run_cli_expect_failure(capsys, out, "--source", "torchvision", "--input", str(wrong))
  assert "layer1.0.conv2.weight" in err and "(5, 5, 64, 64)" in err and "(3, 3, 64, 64)" in err

  err = run_cli_expect_failure(
    capsys, out, "--source", "torchvision", "--input", str(good), "--depth", "101"
  )
  assert "depth=101" in err and "ResNet-50" in err

  err = run_cli_expect_failure(capsys, out, "--source", "caffe3", "--input", str(good))
  assert "Unknown source 'caffe3'" in err

  err = run_cli_expect_failure(
    capsys, out, "--source", "torchvision", "--input", str(good), "--norm", "GN"
  )
  assert "cannot become GN" in err

  err = run_cli_expect_failure(
    capsys, out, "--source", "torchvision", "--input", str(tmp / "missing.pth")
  )
  assert "does not exist" in err


class _System:
  """Pickles as os.system(command): a weight file that would run a command."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_pickles_that_would_run_code_are_refused_and_write_nothing(tmp, capsys):
  marker = tmp / "payload_ran"
  out = str(tmp / "evil_out")
  call = _System(f"touch {marker}")
  blobs = {"conv1_w": np.ones((64, 3, 7, 7), np.float32), "res2_0_branch2a_w": call}
  as_object_array = dict(blobs, res2_0_branch2a_w=np.array([call, 1.0], dtype=object))
  for name, tree, asked in (
    ("evil.pkl", {"blobs": blobs}, f"{os.name}.system"),
    ("evil_object.pkl", as_object_array, "object dtype"),
  ):
    path = tmp / name
    with open(path, "wb") as f:
      pickle.dump(tree, f, protocol=2)
    err = run_cli_expect_failure(capsys, out, "--source", "detectron", "--input", str(path))
    assert name in err and asked in err and "not a plain weight file" in err, err
    assert not marker.exists()
    with pytest.raises(convert.ConversionError, match="not a plain weight file"):
      convert.read_state_dict(str(path))
    assert not marker.exists()


def test_save_backbone_is_atomic(tmp, monkeypatch):
  variables = {"params": {"stem": {"conv1": {"kernel": np.ones((7, 7, 3, 4), np.float32)}}}}
  meta = {k: None for k in convert.META_KEYS}
  out = str(tmp / "atomic_out")
  with pytest.raises(ValueError, match="meta lacks"):
    convert.save_backbone(out, variables, {"depth": 50})
  assert_nothing_written(out)

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(files, "atomic_write", boom)  # the meta.json write fails
  with pytest.raises(OSError, match="disk full"):
    convert.save_backbone(out, variables, meta)
  assert_nothing_written(out)
  monkeypatch.undo()
  convert.save_backbone(out, variables, meta)
  loaded, _ = convert.load_backbone(out)
  np.testing.assert_array_equal(loaded["params"]["stem"]["conv1"]["kernel"], 1.0)


def test_freeze_bn_stages_matches_a_frozen_model(tv_r50):
  _, path = tv_r50
  variables, meta = convert.convert_backbone(str(path), "torchvision", norm="BN")
  frozen = convert.freeze_bn_stages(variables, freeze_at=2)
  assert set(frozen["frozen"]) == {"stem", "res2"} and "res2" not in frozen["batch_stats"]
  assert "norm" not in frozen["params"]["stem"]["conv1"]
  x = random_image(2)
  ref = jax_stages(variables, meta, x)  # eval mode: BN with running statistics
  with jax.default_matmul_precision("highest"):
    got = build_resnet(depth=50, norm="BN", freeze_at=2).apply(frozen, x, train=False)
  assert_rel_close({k: np.asarray(v) for k, v in got.items()}, ref)


# ------------------------------------------------------------------------- whole detectors


@pytest.fixture(scope="module")
def d2_detector(tmp):
  """A Detectron2 R50-FPN GN Mask R-CNN state dict (the fixture's weight rule) and its config."""
  from tests import test_detectron2_fixture as d2_fixture  # pylint: disable=g-import-not-at-top

  record, arrays = d2_fixture.load_case("gn_r50")
  config = tmp / "gn_r50.yaml"
  config.write_text(record["cfg"])
  return d2_fixture.fixture_weights(record, arrays), config


def write_d2_pickle(path, weights):
  with open(path, "wb") as f:
    pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo"}, f)
  return str(path)


def test_detector_bad_inputs_fail_clearly_and_write_nothing(d2_detector, tmp, capsys):
  weights, config = d2_detector
  out = str(tmp / "bad_detector")
  run = lambda path, *extra: run_cli_expect_failure(
    capsys,
    out,
    "--detector",
    "--source",
    "detectron2",
    "--input",
    path,
    "--d2-config",
    str(config),
    *extra,
  )
  good = write_d2_pickle(tmp / "d2_good.pkl", weights)

  truncated = tmp / "d2_truncated.pkl"
  with open(good, "rb") as f:
    truncated.write_bytes(f.read()[: os.path.getsize(good) // 3])
  err = run(str(truncated))
  assert "Cannot read" in err and "d2_truncated.pkl" in err

  resnet = {k: v.numpy() for k, v in torchvision.models.resnet18().state_dict().items()}
  err = run(write_d2_pickle(tmp / "d2_resnet.pkl", resnet))
  assert "not a Detectron2 GeneralizedRCNN" in err

  missing = dict(weights)
  del missing["roi_heads.mask_head.predictor.bias"]
  err = run(write_d2_pickle(tmp / "d2_missing.pkl", missing))
  assert "roi_heads.mask_head.predictor.bias" in err and "(3,)" in err

  leftover = dict(weights)
  leftover["roi_heads.keypoint_head.conv_fcn1.weight"] = np.zeros((512, 256, 3, 3), np.float32)
  err = run(write_d2_pickle(tmp / "d2_leftover.pkl", leftover))
  assert "roi_heads.keypoint_head.conv_fcn1.weight" in err and "no place" in err

  wrong = dict(weights)
  wrong["roi_heads.box_head.fc1.weight"] = np.zeros((1024, 256 * 5 * 5), np.float32)
  err = run(write_d2_pickle(tmp / "d2_wrong_shape.pkl", wrong))
  assert "roi_heads.box_head.fc1.weight" in err and "(6400, 1024)" in err
  assert "(12544, 1024)" in err

  cascade = tmp / "cascade.yaml"
  cascade.write_text(config.read_text().replace("StandardROIHeads", "CascadeROIHeads"))
  err = run_cli_expect_failure(
    capsys,
    out,
    "--detector",
    "--source",
    "detectron2",
    "--input",
    good,
    "--d2-config",
    str(cascade),
  )
  assert "MODEL.ROI_HEADS.NAME='CascadeROIHeads'" in err

  err = run(good, "--source", "caffe3")
  assert "caffe3" in err


def test_detector_without_config_takes_the_structure_from_the_tensors(d2_detector, tmp):
  weights, _ = d2_detector
  path = write_d2_pickle(tmp / "d2_noconfig.pkl", weights)
  variables, model_config, meta = convert.convert_detector(path, "detectron2")
  assert model_config.backbone.norm == "GN" and model_config.fpn.norm == "GN"
  assert model_config.box_head.num_conv == 4 and model_config.box_head.num_fc == 1
  assert model_config.box_head.norm == "GN" and model_config.mask_head.norm == "GN"
  assert model_config.num_classes == 3 and meta["class_names"] is None
  assert not model_config.backbone.stride_in_1x1  # GN weights: stride in the 3x3 conv
  kernel = variables["params"]["roi_heads"]["box_head"]["fc1"]["kernel"]
  np.testing.assert_array_equal(kernel, weights["roi_heads.box_head.fc1.weight"].T)
  # The same model as a .pth of torch tensors ({"model": {name: tensor}}) converts the same.
  pth = tmp / "d2_noconfig.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in weights.items()}}, pth)
  from_pth, config_pth, _ = convert.convert_detector(str(pth), "detectron2")
  assert config_pth.to_dict() == model_config.to_dict()
  same = jax.tree_util.tree_map(np.array_equal, from_pth, variables)
  assert all(jax.tree_util.tree_leaves(same))


def test_detectron2_coco_classes_carry_cocos_category_ids():
  """The 80 names in Detectron2's order sit at their COCO category ids in torchvision's list."""
  from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

  from rethink_jax import zoo_detectron2

  categories = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # index = category id
  ids = zoo_detectron2.COCO_CATEGORY_IDS
  assert len(set(ids)) == len(zoo_detectron2.COCO_CLASS_NAMES) == 80
  assert [categories[i] for i in ids] == list(zoo_detectron2.COCO_CLASS_NAMES)


def test_bad_resnext_inputs_fail_clearly_and_write_nothing(timm_x50, tmp, capsys):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  model, _ = timm_x50
  out = str(tmp / "bad_resnext_out")
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}

  wrong = dict(sd)  # one block's grouped conv with 16 groups instead of 32
  wrong["layer3.2.conv2.weight"] = torch.zeros(512, 32, 3, 3)
  save_file(wrong, str(tmp / "x50_wrong_groups.safetensors"))
  err = run_cli_expect_failure(
    capsys, out, "--source", "timm", "--input", str(tmp / "x50_wrong_groups.safetensors")
  )
  assert "layer3.2.conv2.weight" in err and "(3, 3, 32, 512)" in err and "(3, 3, 16, 512)" in err

  ragged = dict(sd)  # res2.0's conv2: 3 input channels per group do not divide 128
  ragged["layer1.0.conv2.weight"] = torch.zeros(128, 3, 3, 3)
  save_file(ragged, str(tmp / "x50_ragged.safetensors"))
  err = run_cli_expect_failure(
    capsys, out, "--source", "timm", "--input", str(tmp / "x50_ragged.safetensors")
  )
  assert "res2.0.conv2 kernel (128, 3, 3, 3)" in err and "do not divide" in err

  biased = tmp / "biased.pkl"  # a conv bias that is not zero has no place in a bias-free conv
  with open(biased, "wb") as f:
    pickle.dump({"conv1_w": np.ones((64, 3, 7, 7), np.float32), "conv1_b": np.ones(64)}, f)
  err = run_cli_expect_failure(capsys, out, "--source", "detectron", "--input", str(biased))
  assert "conv1_b (64,)" in err and "match no detectron ResNet name" in err
