"""A converted torchvision keypointrcnn_resnet50_fpn equals torchvision's own.

torchvision's keypointrcnn_resnet50_fpn (one class, 17 keypoints) gets fresh random weights
(tests/tv_reference.py: random norms and biases, BN statistics of the test images, RPN and box
classifiers scaled so that > 20 detections per image pass the 0.05 threshold, heatmap logits
std 1) and runs in eval mode, resizing disabled, on three images of different sizes (padded
together to 224 x 288). Its state dict goes through zoo_torchvision.convert, and the converted
model runs on the same normalised, padded batch (Predictor.run_padded). Draws with a detection or
proposal within a score margin of a cut get their classifiers drawn again (as in
tests/test_torchvision_detector.py).

The converted config's keypoint_head.resize_cap is raised to the largest image side, so that
every box side fits the static grid of the bicubic resize, the regime in which the decoding is
exact (ops/keypoints.py; above the cap it is coarse-to-fine).

Checked per image: the same number of detections (>= 20), each torchvision detection matched to
one of ours, boxes within 0.5 px, scores within 1e-3. Keypoints, twice:
  - end to end: [x, y] within 0.5 px of torchvision's keypoints of its own detection, the model's
    "keypoint_logits" within 1e-3 of its keypoints_scores (heatmap logits);
  - the keypoint branch alone: against torchvision's keypoint branch run on OUR boxes
    (tv_reference.keypoints_at): [x, y] within 0.5 px, logits within AT_BOX_LOGIT (2e-4), and
    the model's keypoint score (Detectron2's, keypoints[..., 2]) within 2e-4 (relative) of
    exp(logit - logsumexp of the 56 x 56 heatmap) on torchvision's heatmaps.
The boxes differ by ~5e-3 px (float32 box regression); RoIAlign samples the random-weight
features at the moved points, so the end-to-end logits differ by up to ~7e-4 where the branch
alone differs by < 1e-4. A keypoint beyond the end-to-end tolerances (a box difference that
moved the resized map's ceil(side), or its argmax) is printed; the branch check must hold for it
and such keypoints must be rare (at most MAX_EXCEPTION_FRACTION).

The argmax of the bicubic map may flip between two pixels within float rounding of each other:
where ours differs from torchvision's at our box by more than 0.5 px, our pixel must be within
TIE of the maximum of torchvision's own resized map, and such ties must be rare too.
"""

import os

import numpy as np
import pytest

# torch and torchvision are test dependencies (requirements-test.txt): without them this fails.
import torch
import torch.nn.functional as F

from rethink_jax import convert as convert_lib
from rethink_jax import predict
from rethink_jax import zoo_torchvision
from tests import tv_reference

SIZES = ((160, 288), (224, 192), (200, 256))  # padded together: 224 x 288
MIN_DETECTIONS = 20
PX, LOGIT = 0.5, 1e-3
# torchvision's keypoint branch on our boxes: logits (and Detectron2's scores, relative) within
# this; a second pixel this close to the maximum of torchvision's resized map is a tie.
AT_BOX_LOGIT = TIE = 2e-4
MAX_EXCEPTION_FRACTION = 0.01  # of the keypoints: ties, and differences beyond PX / LOGIT
ARCH = tv_reference.KEYPOINT_ARCHITECTURE


def _state_dict(model):
  # The zoo file's backbone is FrozenBatchNorm2d: no num_batches_tracked anywhere.
  return {
    k: v.detach().numpy()
    for k, v in model.state_dict().items()
    if not k.endswith("num_batches_tracked")
  }


@pytest.fixture(scope="module")
def case():
  """torchvision's reference and the converted model's raw outputs, fresh weights and images."""
  seed = tv_reference.seed()
  rng = np.random.default_rng(seed)
  images = tv_reference.random_images(rng, SIZES)
  model, ref = tv_reference.model_far_from_cuts(ARCH, seed, tv_reference.to_torch(images))
  variables, model_config, meta = zoo_torchvision.convert(_state_dict(model), "keypointrcnn.pth")
  # The reference's settings: its proposal and detection counts, every box under the cap.
  model_config.rpn.post_nms_topk_test = tv_reference.POST_NMS_TOPK
  model_config.roi_heads.detections_per_image = tv_reference.KEYPOINT_DETECTIONS
  model_config.keypoint_head.resize_cap = max(max(s) for s in SIZES)
  predictor = predict.Predictor(variables, model_config, meta, padding="batch")
  prepared = [predict.preprocess(im, predictor.model_config.input, False) for im in images]
  raw = predictor.run_padded(prepared, ref["tensor"].shape[2:])
  n = [len(b) for b in ref["boxes"]]
  at_ours = tv_reference.keypoints_at(
    model, tv_reference.to_torch(images), [raw["boxes"][i][: n[i]] for i in range(len(images))]
  )
  return dict(
    ref=ref,
    raw=raw,
    at_ours=at_ours,
    images=images,
    variables=variables,
    config=model_config,
    meta=meta,
  )


def test_converted_keypoint_model(case):
  from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights

  c, meta, params = case["config"], case["meta"], case["variables"]["params"]
  assert meta["architecture"] == ARCH
  assert c.keypoint_on and not c.mask_on
  assert c.keypoint_head.num_keypoints == tv_reference.NUM_KEYPOINTS
  assert tuple(c.keypoint_head.conv_dims) == (512,) * 8
  assert c.num_classes == tv_reference.NUM_KEYPOINT_CLASSES - 1
  assert "mask_head" not in params["roi_heads"]
  assert sorted(params["roi_heads"]["keypoint_head"]) == sorted(
    [f"conv_fcn{j}" for j in range(1, 9)] + ["score_lowres"]
  )
  weights_meta = KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.meta
  assert meta["class_names"] == weights_meta["categories"][1:]
  assert meta["keypoint_names"] == weights_meta["keypoint_names"]


def _roi_map(heatmap, box):
  """torchvision's resized map of one detection: (K, ceil h, ceil w) bicubic logits."""
  w, h = max(box[2] - box[0], 1.0), max(box[3] - box[1], 1.0)
  size = (int(np.ceil(h)), int(np.ceil(w)))
  maps = torch.as_tensor(heatmap)[:, None]
  return F.interpolate(maps, size=size, mode="bicubic", align_corners=False)[:, 0].numpy()


def _pixel(xy, box, roi_map):
  """The resized map's (row, col) whose centre decodes to keypoint xy (K, 2) in box."""
  h, w = roi_map.shape[1:]
  bw, bh = max(box[2] - box[0], 1.0), max(box[3] - box[1], 1.0)
  col = np.rint((xy[:, 0] - box[0]) * w / bw - 0.5).astype(int)
  row = np.rint((xy[:, 1] - box[1]) * h / bh - 0.5).astype(int)
  return np.clip(row, 0, h - 1), np.clip(col, 0, w - 1)


def _branch_at_our_boxes(ours_xy, ours_logit, at, box, worst, counts, where):
  """Our keypoints of one detection against torchvision's keypoint branch on our box `at`
  (heatmap (K, 56, 56), xy (K, 2), logit (K,)): positions within PX but for argmax ties in
  torchvision's own resized map, logits within AT_BOX_LOGIT."""
  heatmap, at_xy, at_logit = at
  px = np.abs(ours_xy - at_xy).max(-1)
  dlogit = np.abs(ours_logit - at_logit)
  moved = np.flatnonzero(px > PX)
  if len(moved):
    roi_map = _roi_map(heatmap, box)
    rows, cols = _pixel(ours_xy, box, roi_map)
    for k in moved:
      gap = float(roi_map[k].max() - roi_map[k, rows[k], cols[k]])
      print(f"{where} keypoint {k}: {px[k]:.2f} px from torchvision at our box, gap {gap:.2e}")
      assert gap <= TIE and dlogit[k] <= AT_BOX_LOGIT + gap, (where, k, px[k], gap, dlogit[k])
      dlogit[k] = 0.0
    counts["ties"] += len(moved)
    px[moved] = 0.0
  worst["at_box_px"] = max(worst["at_box_px"], float(px.max()))
  worst["at_box_logit"] = max(worst["at_box_logit"], float(dlogit.max()))
  assert dlogit.max() <= AT_BOX_LOGIT, (where, dlogit)


def test_keypoints_equal_torchvision(case):
  ref, raw, at_ours = case["ref"], case["raw"], case["at_ours"]
  worst = dict.fromkeys(
    ("box", "score", "keypoint_px", "keypoint_logit", "at_box_px", "at_box_logit", "d2_score"), 0.0
  )
  counts = dict(keypoints=0, ties=0, beyond=0)
  for i in range(len(case["images"])):
    n = len(ref["boxes"][i])
    assert n >= MIN_DETECTIONS, f"image {i}: only {n} torchvision detections"
    assert int(raw["num_detections"][i]) == n
    boxes, classes = raw["boxes"][i][:n], raw["classes"][i][:n]
    for j, q in tv_reference.match(ref, i, boxes, classes):
      where = f"image {i} detection {j}"
      box = float(np.abs(boxes[q] - ref["boxes"][i][j]).max())
      score = abs(float(raw["scores"][i][q]) - float(ref["scores"][i][j]))
      worst["box"], worst["score"] = max(worst["box"], box), max(worst["score"], score)
      assert box <= PX and score <= LOGIT, (where, box, score)
      ours_xy = raw["keypoints"][i][q][:, :2]
      ours_logit = raw["keypoint_logits"][i][q]
      counts["keypoints"] += len(ours_xy)

      # The keypoint branch alone: torchvision's on our box (q indexes our boxes).
      at_heatmap = at_ours["heatmaps"][i][q]
      at = (at_heatmap, at_ours["keypoints"][i][q][:, :2], at_ours["keypoint_scores"][i][q])
      _branch_at_our_boxes(ours_xy, ours_logit, at, boxes[q], worst, counts, where)

      # End to end: torchvision's own keypoints of its own detection.
      px = np.abs(ours_xy - ref["keypoints"][i][j][:, :2]).max(-1)
      dlogit = np.abs(ours_logit - ref["keypoint_scores"][i][j])
      beyond = np.flatnonzero((px > PX) | (dlogit > LOGIT))
      for k in beyond:  # explained by the boxes' float difference (module doc)
        print(f"{where} keypoint {k}: {px[k]:.2f} px, logit {dlogit[k]:.2e} from torchvision's own")
      counts["beyond"] += len(beyond)
      ok = np.ones(len(px), bool)
      ok[beyond] = False
      worst["keypoint_px"] = max(worst["keypoint_px"], float(px[ok].max(initial=0.0)))
      worst["keypoint_logit"] = max(worst["keypoint_logit"], float(dlogit[ok].max(initial=0.0)))

      # Detectron2's keypoint score: softmax of the resized maximum over the 56 x 56 map.
      lse = np.log(np.exp(at_heatmap.astype(np.float64)).sum((1, 2)))
      expected = np.exp(ours_logit.astype(np.float64) - lse)
      rel = np.abs(raw["keypoints"][i][q][:, 2] - expected) / expected
      worst["d2_score"] = max(worst["d2_score"], float(rel.max()))
      assert rel.max() <= AT_BOX_LOGIT, (where, rel)
  print("worst differences:", worst, counts)
  assert counts["ties"] <= MAX_EXCEPTION_FRACTION * counts["keypoints"], counts
  assert counts["beyond"] <= MAX_EXCEPTION_FRACTION * counts["keypoints"], counts


# ------------------------------------------------------------------------------------------------
# Bad checkpoints (no model runs).
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained_state_dict():
  torch.manual_seed(tv_reference.seed())
  return _state_dict(tv_reference.build(ARCH))


def test_command_line_writes_a_keypoint_detector(untrained_state_dict, tmp_path):
  from rethink_jax import detector_checkpoint

  path = str(tmp_path / "keypointrcnn.pth")
  torch.save({k: torch.from_numpy(v) for k, v in untrained_state_dict.items()}, path)
  out = str(tmp_path / "detector")
  args = ["--detector", "--source", "torchvision", "--input", path, "--output", out]
  assert convert_lib.main(args) == 0
  variables, model_config, meta = detector_checkpoint.load_detector(out)
  assert meta["architecture"] == ARCH and meta["class_names"] == ["person"]
  assert len(meta["keypoint_names"]) == tv_reference.NUM_KEYPOINTS
  assert model_config.keypoint_on and not model_config.mask_on
  assert tuple(model_config.keypoint_head.conv_dims) == (512,) * 8
  assert model_config.keypoint_head.pooler_level_rule == "torchvision"
  assert not model_config.keypoint_head.pooler_aligned
  lowres = variables["params"]["roi_heads"]["keypoint_head"]["score_lowres"]["kernel"]
  weight = untrained_state_dict["roi_heads.keypoint_predictor.kps_score_lowres.weight"]
  np.testing.assert_array_equal(lowres, weight.transpose(2, 3, 0, 1))


def test_bad_keypoint_checkpoint_names_keys_and_writes_nothing(untrained_state_dict, tmp_path):
  bad = dict(untrained_state_dict)
  del bad["roi_heads.keypoint_head.6.weight"]
  bad["roi_heads.keypoint_predictor.extra.weight"] = np.zeros((3, 5), np.float32)
  bad["roi_heads.keypoint_predictor.kps_score_lowres.bias"] = np.zeros((16,), np.float32)
  with pytest.raises(convert_lib.ConversionError) as e:
    zoo_torchvision.convert(bad, "x.pth")
  msg = str(e.value)
  assert "missing key roi_heads.keypoint_head.6.weight" in msg
  assert "keypoint_head/conv_fcn4/kernel (3, 3, 512, 512)" in msg  # where it would have gone
  assert "leftover key roi_heads.keypoint_predictor.extra.weight (3, 5)" in msg
  assert "kps_score_lowres.bias (16,)" in msg and "wants (17,)" in msg

  path = str(tmp_path / "keypointrcnn.pth")
  torch.save({k: torch.from_numpy(v) for k, v in bad.items()}, path)
  out = str(tmp_path / "detector")
  args = ["--detector", "--source", "torchvision", "--input", path, "--output", out]
  assert convert_lib.main(args) == 1
  assert not os.path.exists(out)


def test_frozen_bn_eps_of_the_zoo_files(untrained_state_dict, tmp_path, monkeypatch):
  """FrozenBN folds with eps 0 for the COCO_V1 files torchvision loads so (by sha256 prefix),
  with 1e-5 for any other file, or with the option's eps."""
  sd = dict(untrained_state_dict)
  rng = np.random.default_rng(tv_reference.seed())
  var = rng.uniform(1e-6, 1e-4, sd["backbone.body.bn1.running_var"].shape).astype(np.float32)
  sd["backbone.body.bn1.running_var"] = var
  gamma = sd["backbone.body.bn1.weight"]
  path = tmp_path / "keypointrcnn_resnet50_fpn_coco.pth"
  path.write_bytes(b"stands for the zoo file")

  def stem_scale(**options):
    variables, _, meta = zoo_torchvision.convert(sd, str(path), **options)
    norm = variables["frozen"]["backbone"]["bottom_up"]["stem"]["conv1"]["norm"]
    return norm["scale"], meta["frozen_bn_eps"]

  scale, eps = stem_scale()
  assert eps == 1e-5
  np.testing.assert_allclose(scale, gamma / np.sqrt(var + 1e-5), rtol=1e-6)
  monkeypatch.setattr(convert_lib, "sha256_file", lambda p: "fc266e95" + "0" * 56)
  scale, eps = stem_scale()
  assert eps == 0.0
  np.testing.assert_allclose(scale, gamma / np.sqrt(var), rtol=1e-6)
  scale, eps = stem_scale(frozen_bn_eps=1e-3)
  assert eps == 1e-3
  np.testing.assert_allclose(scale, gamma / np.sqrt(var + 1e-3), rtol=1e-6)
