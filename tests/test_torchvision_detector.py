"""Converted torchvision Mask R-CNNs equal torchvision's own, through the Predictor.

For each architecture (maskrcnn_resnet50_fpn, _v2, and the GroupNorm model of
scripts/benchmark_model.py) torchvision's model gets fresh random weights (tests/tv_reference.py:
random norms and biases, BN statistics of the test images, heads scaled so that > 20 detections per
image pass the 0.05 threshold) and runs in eval mode, resizing disabled, on three images of
different sizes. Its state dict goes through zoo_torchvision.convert and the Predictor runs on the
same uint8 images with resize=False and padding="batch" (torchvision's own padding of a list of
images: the batch's largest size rounded up to 32, which GroupNorm's statistics see).

The image sizes pad to 224 x 288, so P6 is 4 x 5 on a 7 x 9 P5: torchvision's anchor strides
there are 56 and 57, not 64 (anchors.grid_strides).

A draw where a detection's score lies within 1e-4 of the score threshold or of the 100th place
(tv_reference.MARGIN), a proposal's objectness logit within 3e-4 of the RPN's pre- or post-NMS
top-k, or two boxes' IoU within 2e-5 of an NMS threshold (the RPN's or the per-class one), gets
its RPN and box classifiers drawn again: scores differ by ~1e-5 between the implementations, so
such a detection may fall on either side of the cut (the Detectron2 fixture records its margins
for the same reason).

Checked per image: the same number of detections (>= 20), each torchvision detection matched to
one of ours with the same label, boxes within 0.5 px, scores within 1e-3, pasted masks with IoU
>= 0.98; the 28 x 28 mask probabilities; and the COCO AP of both on the same images equal within
0.1 (AP points).

torchvision's paste truncates the expanded box to integers, a step function of the box: where a
box edge lies within the boxes' float difference (~1e-3 px) of an integer, the two integer boxes
differ by one pixel and the whole pasted mask moves by one pixel (IoU ~0.85 for the ragged masks
of random weights). Such a detection (printed) must have different integer boxes, and our mask
must equal torchvision's paste_masks_in_image of its probabilities at our box (IoU >= 0.98).

The ground truth for the AP: every second torchvision detection of score > 0.1, its box jittered
by up to 4 px and its pasted mask shifted by up to 3 px, so that neither set scores trivially
(AP of 100) and a detection that differs moves the AP.
"""

import contextlib
import io
import os

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import pytest

# torch and torchvision are test dependencies (requirements-test.txt): without them this fails.
import torch
import torchvision  # noqa: F401

from rethink_jax import convert as convert_lib
from rethink_jax import predict
from rethink_jax import zoo_torchvision
from tests import tv_reference

SIZES = ((160, 288), (224, 192), (200, 256))  # padded together: 224 x 288
MIN_DETECTIONS = 20


def _state_dict(model, architecture):
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  if architecture == "maskrcnn_resnet50_fpn":
    # The zoo file's backbone is FrozenBatchNorm2d: no num_batches_tracked anywhere.
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  return sd


@pytest.fixture(scope="module", params=tv_reference.ARCHITECTURES)
def case(request):
  """torchvision's reference and the Predictor's outputs (and raw model outputs) for one
  architecture, with fresh weights and images."""
  architecture = request.param
  seed = tv_reference.seed()
  rng = np.random.default_rng(seed)
  images = tv_reference.random_images(rng, SIZES)
  model, ref = tv_reference.model_far_from_cuts(architecture, seed, tv_reference.to_torch(images))
  variables, model_config, meta = zoo_torchvision.convert(
    _state_dict(model, architecture), "maskrcnn.pth"
  )
  assert meta["architecture"] == architecture
  model_config.rpn.post_nms_topk_test = tv_reference.POST_NMS_TOPK  # the reference's setting
  predictor = predict.Predictor(variables, model_config, meta, padding="batch")
  ours = predictor(images, resize=False)
  prepared = [predict.preprocess(im, predictor.model_config.input, False) for im in images]
  raw = predictor.run_padded(prepared, ref["tensor"].shape[2:])
  assert predictor.compilations == 1
  return dict(ref=ref, ours=ours, raw=raw, images=images, config=predictor.model_config)


def _paste_box(box):
  """torchvision's integer box of paste_masks_in_image (padding 1, 28 x 28 masks)."""
  from torchvision.models.detection.roi_heads import expand_boxes

  return expand_boxes(torch.as_tensor(box)[None], 30 / 28).to(torch.int64)[0].tolist()


def _torchvision_paste(prob, box, hw):
  from torchvision.models.detection.roi_heads import paste_masks_in_image

  masks = torch.as_tensor(prob)[None, None]
  return paste_masks_in_image(masks, torch.as_tensor(box)[None], hw, padding=1)[0, 0].numpy() > 0.5


def _iou(a, b):
  union = np.logical_or(a, b).sum()
  return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def test_predictor_equals_torchvision(case):
  ref, ours, raw, cfg = case["ref"], case["ours"], case["raw"], case["config"]
  worst = dict(box=0.0, score=0.0, mask_prob=0.0, mask_iou=1.0)
  for i, image in enumerate(case["images"]):
    n = len(ref["boxes"][i])
    # Our fixed-shape inference keeps the best test_candidates (proposal, class) pairs before NMS.
    assert ref["candidates"][i] <= cfg.roi_heads.test_candidates
    assert n >= MIN_DETECTIONS, f"image {i}: only {n} torchvision detections"
    assert len(ours[i]["boxes"]) == n
    assert ours[i]["masks"].shape == (n,) + image.shape[:2]
    for j, q in tv_reference.match(ref, i, ours[i]["boxes"], ours[i]["labels"]):
      box = np.abs(ours[i]["boxes"][q] - ref["boxes"][i][j]).max()
      score = abs(float(ours[i]["scores"][q]) - float(ref["scores"][i][j]))
      iou = _iou(ours[i]["masks"][q], ref["pasted"][i][j])
      if iou < 0.98:  # the paste's integer box stepped (module doc)
        ours_box = ours[i]["boxes"][q]
        print(f"image {i} detection {j}: IoU {iou:.3f}, integer boxes", end=" ")
        print(_paste_box(ref["boxes"][i][j]), _paste_box(ours_box))
        assert _paste_box(ref["boxes"][i][j]) != _paste_box(ours_box)
        shifted = _torchvision_paste(ref["mask_probs"][i][j], ours_box, image.shape[:2])
        iou = _iou(ours[i]["masks"][q], shifted)
      worst["box"], worst["score"] = max(worst["box"], box), max(worst["score"], score)
      worst["mask_iou"] = min(worst["mask_iou"], iou)
      assert box <= 0.5 and score <= 1e-3 and iou >= 0.98, (i, j, box, score, iou)
    # The model's own 28 x 28 probabilities (classes 1..K are torchvision's labels here).
    k = int(raw["num_detections"][i])
    assert k == n
    for j, q in tv_reference.match(ref, i, raw["boxes"][i][:k], raw["classes"][i][:k]):
      d = np.abs(raw["masks"][i][q] - ref["mask_probs"][i][j]).max()
      worst["mask_prob"] = max(worst["mask_prob"], float(d))
  print("worst differences:", worst)
  assert worst["mask_prob"] <= 1e-2


def _coco_ap(gt, dets, images):
  """bbox and segm AP (0..100) of dets [(image index, box, score, label, mask)] against gt."""
  coco = COCO()
  coco.dataset = {
    "images": [
      {"id": i + 1, "height": im.shape[0], "width": im.shape[1]} for i, im in enumerate(images)
    ],
    "categories": [{"id": c} for c in range(1, tv_reference.NUM_CLASSES)],
    "annotations": gt,
  }
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  results = []
  for i, box, score, label, mask in dets:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    x0, y0, x1, y1 = (float(v) for v in box)
    results.append(
      dict(image_id=i + 1, category_id=int(label), bbox=[x0, y0, x1 - x0, y1 - y0],
           score=float(score), segmentation=rle)
    )  # fmt: skip
  aps = {}
  with contextlib.redirect_stdout(io.StringIO()):
    loaded = coco.loadRes(results)
    for kind in ("bbox", "segm"):
      e = COCOeval(coco, loaded, kind)
      e.evaluate()
      e.accumulate()
      e.summarize()
      aps[kind] = 100.0 * e.stats[0]
  return aps


def _synthetic_gt(ref, images, rng):
  """COCO ground truth near every other torchvision detection scoring > 0.1: its box moved by up
  to 4 px per side, its pasted mask by up to 3 px."""
  gt = []
  for i, im in enumerate(images):
    h, w = im.shape[:2]
    keep = np.flatnonzero(ref["scores"][i] > 0.1)[::2]
    for j in keep:
      x0, y0, x1, y1 = np.clip(ref["boxes"][i][j] + rng.uniform(-4, 4, 4), 0, [w, h, w, h])
      if x1 - x0 < 2 or y1 - y0 < 2:
        continue
      dy, dx = rng.integers(-3, 4, 2)
      mask = np.roll(ref["pasted"][i][j], (dy, dx), (0, 1)).astype(np.uint8)
      rle = mask_utils.encode(np.asfortranarray(mask))
      rle["counts"] = rle["counts"].decode()
      gt.append(
        dict(id=len(gt) + 1, image_id=i + 1, category_id=int(ref["labels"][i][j]),
             bbox=[x0, y0, x1 - x0, y1 - y0], area=float(mask.sum()), iscrowd=0,
             segmentation=rle)
      )  # fmt: skip
  return gt


def test_coco_ap_equal(case):
  """Both sides' COCO AP on synthetic ground truth, from their boxes, labels and masks. Our
  detections are ranked by their torchvision partners' scores: the scores themselves are
  compared above (within 1e-3, ~1e-5 in practice), and ~100 detections of 3 labels per image
  always hold pairs closer than that, whose order, and with it the AP, may flip. AP is
  discontinuous in the boxes too: a detection whose IoU with a ground-truth box sits within the
  boxes' 1e-3 px difference of one of COCOeval's ten thresholds can move it by ~1 point for a
  draw of the ground truth. So up to five draws of the ground truth are tried and one of them
  must give equal APs (within 0.1); detections that really differ differ on every draw."""
  ref, ours, images = case["ref"], case["ours"], case["images"]
  rng = np.random.default_rng(tv_reference.seed())
  theirs = [
    (i, b, s, lab, m)
    for i in range(len(images))
    for b, s, lab, m in zip(ref["boxes"][i], ref["scores"][i], ref["labels"][i], ref["pasted"][i])
  ]
  mine = [
    (i, o["boxes"][q], ref["scores"][i][j], o["labels"][q], o["masks"][q])
    for i, o in enumerate(ours)
    for j, q in tv_reference.match(ref, i, o["boxes"], o["labels"])
  ]
  draws = []
  for _ in range(5):
    gt = _synthetic_gt(ref, images, rng)
    ap_ref, ap_ours = _coco_ap(gt, theirs, images), _coco_ap(gt, mine, images)
    print("AP torchvision", ap_ref, "ours", ap_ours)
    for kind in ("bbox", "segm"):
      assert 0.0 < ap_ref[kind] < 100.0
    draws.append((ap_ref, ap_ours))
    if all(abs(ap_ref[k] - ap_ours[k]) <= 0.1 for k in ("bbox", "segm")):
      return
  pytest.fail(f"COCO AP differs by more than 0.1 on five ground-truth draws: {draws}")


# ------------------------------------------------------------------------------------------------
# The converter's errors, its meta and the command line (no model runs).
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v1_state_dict():
  torch.manual_seed(tv_reference.seed())
  return _state_dict(tv_reference.build("maskrcnn_resnet50_fpn"), "maskrcnn_resnet50_fpn")


def test_conversion_errors_name_keys_and_shapes(v1_state_dict):
  sd = dict(v1_state_dict)
  del sd["backbone.body.layer2.1.conv2.weight"]
  sd["roi_heads.extra.weight"] = np.zeros((3, 5), np.float32)
  sd["backbone.fpn.layer_blocks.1.0.bias"] = np.zeros((255,), np.float32)
  with pytest.raises(convert_lib.ConversionError) as e:
    zoo_torchvision.convert(sd, "x.pth")
  msg = str(e.value)
  assert "missing key backbone.body.layer2.1.conv2.weight" in msg
  assert "(3, 3, 128, 128)" in msg  # the shape the model wants there
  assert "leftover key roi_heads.extra.weight (3, 5)" in msg
  assert "backbone.fpn.layer_blocks.1.0.bias (255,)" in msg and "wants (256,)" in msg

  other = {k: v for k, v in v1_state_dict.items() if not k.startswith("rpn.head.conv.")}
  with pytest.raises(convert_lib.ConversionError, match="unknown torchvision Mask R-CNN layout"):
    zoo_torchvision.convert(other, "x.pth")
  with pytest.raises(convert_lib.ConversionError, match="not a torchvision Mask R-CNN"):
    zoo_torchvision.convert({"conv1.weight": np.zeros((64, 3, 7, 7))}, "x.pth")
  with pytest.raises(convert_lib.ConversionError, match="unknown torchvision options"):
    zoo_torchvision.convert(v1_state_dict, "x.pth", sampling_ratio=0)


def test_coco_class_names_are_torchvisions():
  from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

  categories = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
  assert list(zoo_torchvision.COCO_CATEGORIES) == list(categories)


def test_command_line_writes_a_detector_checkpoint(v1_state_dict, tmp_path):
  from rethink_jax import detector_checkpoint

  path = str(tmp_path / "maskrcnn.pth")
  torch.save({k: torch.from_numpy(v) for k, v in v1_state_dict.items()}, path)
  out = str(tmp_path / "detector")
  assert (
    convert_lib.main(["--detector", "--source", "torchvision", "--input", path, "--output", out])
    == 0
  )
  variables, model_config, meta = detector_checkpoint.load_detector(out)
  assert meta["source"] == "torchvision" and meta["sha256"] == convert_lib.sha256_file(path)
  assert meta["architecture"] == "maskrcnn_resnet50_fpn" and meta["class_names"] is None
  assert model_config.num_classes == tv_reference.NUM_CLASSES - 1
  assert model_config.output.first_label == 1 and model_config.input.format == "RGB"
  k = tv_reference.NUM_CLASSES - 1
  cls = variables["params"]["roi_heads"]["box_predictor"]["cls_score"]["kernel"]
  # Background (torchvision's row 0) is the last column here.
  np.testing.assert_array_equal(
    cls[:, k], v1_state_dict["roi_heads.box_predictor.cls_score.weight"][0]
  )
  np.testing.assert_array_equal(
    cls[:, :k].T, v1_state_dict["roi_heads.box_predictor.cls_score.weight"][1:]
  )

  bad = str(tmp_path / "bad.pth")
  with open(path, "rb") as f:
    data = f.read()
  with open(bad, "wb") as f:
    f.write(data[: len(data) // 2])
  out2 = str(tmp_path / "detector2")
  assert (
    convert_lib.main(["--detector", "--source", "torchvision", "--input", bad, "--output", out2])
    == 1
  )
  assert not os.path.exists(out2)
