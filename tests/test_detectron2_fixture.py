"""A converted Detectron2 Mask R-CNN equals Detectron2 itself, on outputs recorded by Detectron2.

tests/fixtures/detectron2 (see its README) holds, for two R50-FPN cases (GN scratch 4conv1fc, and
the FrozenBN 2fc model-zoo config), what Detectron2 computed on a batch of two images of unequal
sizes with weights from a seeded rule: FPN sums, proposals, detections, mask probabilities, pasted
masks, and with every labeled anchor / proposal sampled, the five losses and every gradient norm.
Here the same weights are regenerated, written as a model-zoo .pkl, converted through the command
line with the case's own config, and our model's outputs are compared with those records.
"""

import json
import os
import pickle
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rethink_jax import convert
from rethink_jax import detector_checkpoint
from rethink_jax import evaluate
from rethink_jax import zoo_detectron2
from rethink_jax.models.mask_rcnn import build_model

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "detectron2")
CASES = ("gn_r50", "frozenbn_r50")
SCORE_LAYERS = (
  "proposal_generator.rpn_head.objectness_logits.weight",
  "roi_heads.box_predictor.cls_score.weight",
)
NUM_IMAGES = 2


def fixture_weights(record: dict, arrays) -> dict[str, np.ndarray]:
  """The README's weight rule for every entry of record["params"] (BN statistics from stat:)."""
  weights = {}
  for p in record["params"]:
    name, shape = p["name"], tuple(p["shape"])
    rng = np.random.default_rng(zlib.crc32(name.encode()) + record["seed_offset"])
    z = rng.standard_normal(shape).astype(np.float32)
    leaf = name.rsplit(".", 1)[1]
    if leaf == "running_var":
      value = 1 + 0.2 * np.abs(z)
    elif leaf in ("running_mean", "bias"):
      value = 0.1 * z
    elif leaf == "weight" and len(shape) == 1:
      value = 1 + 0.1 * z
    else:
      value = z / np.sqrt(np.prod(shape[1:]))
      if name in SCORE_LAYERS:
        value = value * record["spread"]
    weights[name] = value.astype(np.float32)
  return weights


def load_case(case: str) -> tuple[dict, dict]:
  with open(os.path.join(FIXTURES, case + ".json")) as f:
    record = json.load(f)
  arrays = dict(np.load(os.path.join(FIXTURES, case + ".npz")))
  return record, arrays


def fixture_batch(record: dict, arrays: dict) -> dict:
  """Detectron2's ImageList: BGR normalised with the config's mean / std, then zero-padded to the
  batch's largest size rounded up to 32; image_hw the real sizes."""
  mean = np.asarray(record["pixel_mean"], np.float32)
  std = np.asarray(record["pixel_std"], np.float32)
  images = [arrays[f"image{i}"] for i in range(NUM_IMAGES)]
  h = -(-max(im.shape[0] for im in images) // 32) * 32
  w = -(-max(im.shape[1] for im in images) // 32) * 32
  batch = np.zeros((NUM_IMAGES, h, w, 3), np.float32)
  for i, im in enumerate(images):
    batch[i, : im.shape[0], : im.shape[1]] = (im.astype(np.float32) - mean) / std
  hw = np.asarray([im.shape[:2] for im in images], np.int32)
  return {"image": batch, "image_hw": hw}


@pytest.fixture(scope="module", params=CASES)
def converted(request, tmp_path_factory):
  """(case, record, arrays, variables, model_config) converted through the command line."""
  case = request.param
  record, arrays = load_case(case)
  weights = fixture_weights(record, arrays)
  for name in weights:
    if "stat:" + name in arrays:
      weights[name] = arrays["stat:" + name].astype(np.float32)
  tmp = tmp_path_factory.mktemp(case)
  pkl, yaml_path = tmp / "model_final.pkl", tmp / "config.yaml"
  with open(pkl, "wb") as f:
    pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo"}, f)
  yaml_path.write_text(record["cfg"])
  out = tmp / "detector"
  argv = ["--detector", "--source", "detectron2", "--input", str(pkl), "--output", str(out)]
  assert convert.main(argv + ["--d2-config", str(yaml_path)]) == 0
  variables, model_config, meta = detector_checkpoint.load_detector(str(out))
  assert meta["source"] == "detectron2" and meta["class_names"] is None
  return case, record, arrays, variables, model_config


def test_weight_rule_reproduces_the_recorded_sums():
  for case in CASES:
    record, arrays = load_case(case)
    weights = fixture_weights(record, arrays)
    for p in record["params"]:
      v = weights[p["name"]]
      np.testing.assert_allclose(v.astype(np.float64).sum(), p["sum"], rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(v.ravel()[:3], p["first"], rtol=1e-6)


def test_inverse_map_names_every_parameter(converted):
  case, record, _, variables, _ = converted
  names = {p["name"] for p in record["params"]}
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  for path, _ in flat:
    name = zoo_detectron2.d2_name(tuple(k.key for k in path))
    assert name in names, (case, name)
