"""Predictor(tta=...) and `predict --tta` on a tiny randomly initialised detector.

One unflipped view at the model's own size is the plain Predictor; several views equal the
model run view by view (resized, flipped in NumPy, detections mapped back by hand) merged by
torchvision's batched_nms (Detectron2's call) and mask probabilities averaged in NumPy; flip
TTA is flip-equivariant; the command line writes results.json and the PNGs.
"""

import json
import os

import numpy as np
import pytest
import torch
import torchvision

from rethink_jax import evaluate
from rethink_jax import predict
from rethink_jax import tta
from tests import tiny_detector

CLASS_NAMES = tiny_detector.CLASS_NAMES
# Pasted masks threshold probabilities near 0.5 (random weights): boxes equal to float rounding
# may flip a few border pixels, no more.
MASK_PIXELS_OFF = 2e-3


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
  """(directory, variables, model config) of a tiny detector, and a cache of its Predictors."""
  directory, variables, config, meta = tiny_detector.save(str(tmp_path_factory.mktemp("tiny")))
  predictors = {}

  def get(padding="bucket", **tta_fields):
    key = (padding,) + tuple(sorted(tta_fields.items()))
    if key not in predictors:
      tta_config = tta_fields or None
      predictors[key] = predict.Predictor(variables, config, meta, padding=padding, tta=tta_config)
    return predictors[key]

  return dict(directory=directory, variables=variables, config=config, predictor=get)


def _images(rng, sizes):
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _check_masks(got, want):
  assert got.shape == want.shape and got.dtype == want.dtype == bool
  assert np.mean(got != want) <= MASK_PIXELS_OFF


def _pairing(got, want, box_atol):
  """For each detection of `got`, its equal in `want` (same label, score within 1e-5 relative,
  box within box_atol): detections whose scores tie within float noise may come in either
  order."""
  pairs, free = [], set(range(len(want["scores"])))
  for i in range(len(got["scores"])):
    same = [
      j
      for j in sorted(free)
      if got["labels"][i] == want["labels"][j]
      and abs(got["scores"][i] - want["scores"][j]) <= 1e-5 * abs(want["scores"][j])
      and np.max(np.abs(got["boxes"][i] - want["boxes"][j])) <= box_atol
    ]
    assert same, (i, got["labels"][i], got["scores"][i], got["boxes"][i], want)
    j = min(same, key=lambda j: np.max(np.abs(got["boxes"][i] - want["boxes"][j])))
    pairs.append(j)
    free.remove(j)
  return np.asarray(pairs)


def _check_same(got, want, box_atol=1e-3):
  assert len(got["scores"]) == len(want["scores"]) > 0
  order = _pairing(got, want, box_atol)
  np.testing.assert_array_equal(got["labels"], want["labels"][order])
  assert got["names"] == [want["names"][j] for j in order]
  np.testing.assert_allclose(got["scores"], want["scores"][order], rtol=1e-5)
  np.testing.assert_allclose(got["boxes"], want["boxes"][order], atol=box_atol)
  _check_masks(got["masks"], want["masks"][order])


def test_one_unflipped_view_is_the_plain_predictor(detector):
  rng = np.random.default_rng()
  plain = detector["predictor"]()
  with_tta = detector["predictor"](min_sizes=(64,), max_size=96, flip=False)
  # Resized to 64 x 85 (bucket 64 x 96), 96 x 53 (96 x 64, the longer side capped), 64 x 96.
  images = _images(rng, [(48, 64), (90, 50), (40, 60)])
  for got, want in zip(with_tta(images), plain(images)):
    _check_same(got, want)
  # The raw outputs: the same detections (in original pixels) and mask probabilities.
  x = predict.preprocess(images[0], plain.model_config.input, True)
  scale = np.array([x.shape[0] / 48, x.shape[1] / 64], np.float32)
  want = plain.run_padded([x], (64, 96))
  got = with_tta.run_tta_padded([[(x, scale)]], [(48, 64)], [(64, 96)])
  n = int(want["num_detections"][0])
  assert int(got["num_detections"][0]) == n > 0
  np.testing.assert_array_equal(got["classes"][0, :n], want["classes"][0, :n])
  np.testing.assert_allclose(got["scores"][0, :n], want["scores"][0, :n], rtol=1e-6)
  boxes = want["boxes"][0, :n] / np.tile(scale[::-1], 2)
  np.testing.assert_allclose(got["boxes"][0, :n], boxes, atol=1e-4)
  np.testing.assert_allclose(got["masks"][0, :n], want["masks"][0, :n], atol=1e-5)
  # detect and mask programs for the two canvases, one merge, one average.
  assert with_tta.compilations == 6
  with_tta(_images(rng, [(30, 41), (100, 57)]))  # other sizes, the same canvases
  assert with_tta.compilations == 6


def _reference_merge(boxes, scores, classes, orig_hw, nms_thresh, detections_per_image):
  """Detectron2's _merge_detections for one image: clip, scores > 1e-8, batched_nms, the best
  detections_per_image; then detector_postprocess's nonempty filter."""
  h, w = orig_hw
  boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32)).astype(np.float32)
  keep = (classes > 0) & (scores > 1e-8)
  boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
  kept = torchvision.ops.batched_nms(
    torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), nms_thresh
  ).numpy()[:detections_per_image]
  boxes, scores, classes = boxes[kept], scores[kept], classes[kept]
  nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return boxes[nonempty], scores[nonempty], classes[nonempty]


def test_views_merged_and_masks_averaged_as_detectron2(detector):
  """Two sizes, plain and flipped: every view through the plain model, mapped back, merged and
  its masks averaged outside the TTA code."""
  import jax  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng()
  sizes, max_size = (48, 80), 120
  with_tta = detector["predictor"]("image", min_sizes=sizes, max_size=max_size, flip=True)
  plain = detector["predictor"]("image")
  config = detector["config"]
  h0, w0 = 50, 70
  [image] = _images(rng, [(h0, w0)])
  [got] = with_tta([image])

  views = []  # (normalised image, flipped, scale [y, x], canvas)
  for size in sizes:
    view_input = config.input.copy_and_resolve_references()
    view_input.update(min_size_test=size, max_size_test=max_size)
    x = predict.preprocess(image, view_input, True)
    h1, w1 = x.shape[:2]
    assert h1 == size
    canvas = (-(-h1 // 32) * 32, -(-w1 // 32) * 32)
    for flip in (False, True):
      views.append((x[:, ::-1] if flip else x, flip, np.array([h1 / h0, w1 / w0]), canvas))
  union = []
  for x, flip, scale, canvas in views:
    raw = plain.run_padded([x], canvas)
    n = int(raw["num_detections"][0])
    boxes = raw["boxes"][0, :n].astype(np.float64)
    if flip:
      w1 = x.shape[1]
      boxes = np.stack([w1 - boxes[:, 2], boxes[:, 1], w1 - boxes[:, 0], boxes[:, 3]], axis=1)
    boxes = boxes / np.tile(scale[::-1], 2)
    union.append((boxes.astype(np.float32), raw["scores"][0, :n], raw["classes"][0, :n]))
  boxes, scores, classes = (np.concatenate(u) for u in zip(*union))
  heads = config.roi_heads
  boxes, scores, classes = _reference_merge(
    boxes, scores, classes, (h0, w0), heads.nms_thresh_test, heads.detections_per_image
  )
  np.testing.assert_array_equal(got["labels"], classes - 1)
  np.testing.assert_allclose(got["scores"], scores, rtol=1e-5)
  np.testing.assert_allclose(got["boxes"], boxes, atol=1e-3)

  # The mask head on the merged boxes in every view, flipped views' masks mirrored back.
  probs = []
  d = len(scores)
  for x, flip, scale, canvas in views:
    w1 = x.shape[1]
    view_boxes = boxes * np.tile(scale[::-1], 2)
    if flip:
      view_boxes = np.stack(
        [w1 - view_boxes[:, 2], view_boxes[:, 1], w1 - view_boxes[:, 0], view_boxes[:, 3]], axis=1
      )
    batch = {"image": np.zeros((1, *canvas, 3), np.float32), "image_hw": np.array([x.shape[:2]])}
    batch["image"][0, : x.shape[0], : x.shape[1]] = x
    p = plain.model.apply(
      detector["variables"],
      batch,
      view_boxes[None].astype(np.float32),
      classes[None].astype(np.int32),
      np.ones((1, d), bool),
      method=tta._mask_probs,  # pylint: disable=protected-access
    )
    p = np.asarray(jax.device_get(p))[0]
    probs.append(p[..., ::-1] if flip else p)
  # The averaged probabilities themselves (pasted masks threshold values near 0.5).
  view_inputs = [(x, scale) for x, flip, scale, _ in views if not flip]
  canvases = [canvas for _, flip, _, canvas in views if not flip]
  raw = with_tta.run_tta_padded([view_inputs], [(h0, w0)], canvases)
  n = int(raw["num_detections"][0])
  raw_boxes = raw["boxes"][0, :n]
  nonempty = (raw_boxes[:, 2] > raw_boxes[:, 0]) & (raw_boxes[:, 3] > raw_boxes[:, 1])
  np.testing.assert_allclose(raw_boxes[nonempty], boxes, atol=1e-3)
  np.testing.assert_allclose(raw["masks"][0, :n][nonempty], np.mean(probs, axis=0), atol=1e-5)
  masks = evaluate.paste_masks(np.mean(probs, axis=0), boxes, (h0, w0))
  _check_masks(got["masks"], np.ascontiguousarray(masks.transpose(2, 0, 1)).astype(bool))
  assert with_tta.compilations == 2 + 2 + 2  # detect and masks at 2 canvases, merge, average


def _mirrored(result, w):
  """Detections (boxes, [masks]) mirrored left-right in an image `w` pixels wide."""
  x1, y1, x2, y2 = result["boxes"].T
  out = dict(result, boxes=np.stack([w - x2, y1, w - x1, y2], axis=1))
  if "masks" in result:
    out["masks"] = result["masks"][..., ::-1]
  return out


def test_flip_tta_is_flip_equivariant(detector):
  """Views {image, mirrored image}: the mirrored image's detections are the mirrored ones."""
  rng = np.random.default_rng()
  with_tta = detector["predictor"](min_sizes=(64,), max_size=96, flip=True)
  [image] = _images(rng, [(64, 80)])  # the model's own size: nothing resized
  got, mirrored = with_tta([image, image[:, ::-1].copy()])
  _check_same(mirrored, _mirrored(got, 80), box_atol=1e-4)
  # The averaged mask probabilities are mirrored too.
  x = predict.preprocess(image, with_tta.model_config.input, True)
  ones = np.ones(2, np.float32)
  raw = with_tta.run_tta_padded([[(x, ones)], [(x[:, ::-1], ones)]], [(64, 80)] * 2, [(64, 96)])
  n = int(raw["num_detections"][0])
  assert int(raw["num_detections"][1]) == n > 0
  views = [
    {"labels": raw["classes"][b, :n], "scores": raw["scores"][b, :n], "boxes": raw["boxes"][b, :n]}
    for b in range(2)
  ]
  order = _pairing(_mirrored(views[1], 80), views[0], box_atol=1e-4)
  np.testing.assert_array_equal(raw["classes"][1, n:], raw["classes"][0, n:])  # the padding
  np.testing.assert_allclose(raw["masks"][1, :n], raw["masks"][0, order, :, ::-1], atol=1e-6)
  # Both views count: the merged set differs from the unflipped view's alone.
  [single] = detector["predictor"](min_sizes=(64,), max_size=96, flip=False)([image])
  assert len(single["scores"]) != len(got["scores"]) or not np.allclose(
    single["boxes"], got["boxes"]
  )


def test_keypoint_models_refuse_tta():
  config = tiny_detector.model_config()
  config.mask_on, config.keypoint_on = False, True
  with pytest.raises(NotImplementedError, match="keypoint"):
    predict.Predictor({}, config, tta={"min_sizes": (64,)})


def test_tta_config_fields(detector):
  p = predict.Predictor({}, detector["config"], tta={"flip": False})
  assert tuple(p.tta.min_sizes) == tuple(tta.default_tta_config().min_sizes)
  assert (p.tta.max_size, p.tta.flip) == (4000, False)
  assert predict.Predictor({}, detector["config"], tta={"enabled": False}).tta is None
  with pytest.raises(ValueError, match="resize"):
    p([np.zeros((8, 8, 3), np.uint8)], resize=False)


def test_cli_with_tta_writes_results_and_pngs(detector, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng()
  in_dir, out_dir = tmp_path / "images", tmp_path / "out"
  in_dir.mkdir()
  sizes = [(48, 64), (90, 50)]
  for i, image in enumerate(_images(rng, sizes)):
    Image.fromarray(image).save(in_dir / f"{i + 1:012d}.png")
  argv = ["--checkpoint", detector["directory"], "--input", str(in_dir), "--output", str(out_dir)]
  argv += ["--score-thresh", "0.1", "--tta", "--tta-min-sizes", "64", "--tta-max-size", "96"]
  assert predict.main(argv) == 0
  results = json.loads((out_dir / "results.json").read_text())
  assert results and {r["image_id"] for r in results} <= {1, 2}
  for r in results:
    assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert r["category_id"] in (0, 1, 2) and r["score"] >= 0.1
  # The same detections as the Predictor's TTA (flip on by default).
  with_tta = detector["predictor"](min_sizes=(64,), max_size=96, flip=True)
  images = [np.asarray(Image.open(in_dir / f"{i + 1:012d}.png")) for i in range(2)]
  want = [r for i, res in enumerate(with_tta(images)) for r in predict.to_coco(res, i + 1)]
  want = [r for r in want if r["score"] >= 0.1]
  assert [(r["image_id"], r["category_id"]) for r in results] == [
    (r["image_id"], r["category_id"]) for r in want
  ]
  np.testing.assert_allclose([r["bbox"] for r in results], [r["bbox"] for r in want], atol=1e-4)
  for i, (h, w) in enumerate(sizes):
    assert np.asarray(Image.open(out_dir / f"{i + 1:012d}.png")).shape == (h, w, 3)
  assert sorted(os.listdir(out_dir)) == sorted(
    ["results.json", "images.json"] + [f"{i + 1:012d}.png" for i in range(2)]
  )


def test_bucket_canvases_of_the_views_are_few():
  """Detectron2's defaults on COCO-sized images: each view size has a fixed set of canvases
  (the model's 800 / 1333 ladder scaled to the view, then rungs up to max_size), so new image
  sizes compile nothing."""
  from rethink_jax.models import config as model_config  # pylint: disable=g-import-not-at-top

  p = predict.Predictor({}, model_config.default_model_config(), tta={})
  rng = np.random.default_rng()
  round_up = lambda x: -(-int(np.ceil(x)) // 32) * 32
  usual = [(480, 640), (427, 640), (640, 480), (375, 500), (612, 612), (333, 500)]
  usual += [(int(rng.integers(400, 641)), 640) for _ in range(3)]  # aspect <= 1.6
  wide = [(256, 640), (270, 640), (300, 640)]  # aspect 2.1 to 2.5: above the scaled top
  for i, size in enumerate(p.tta.min_sizes):
    canvases = {"usual": set(), "wide": set()}
    for kind, sizes in (("usual", usual), ("wide", wide)):
      for h, w in sizes:
        x, scale = p._tta_view(np.zeros((h, w, 3), np.uint8), i)  # pylint: disable=protected-access
        assert min(x.shape[:2]) == size and max(x.shape[:2]) <= p.tta.max_size
        np.testing.assert_allclose(scale, np.array(x.shape[:2]) / (h, w), rtol=1e-6)
        canvas = p._tta_canvas(*x.shape[:2], i)  # pylint: disable=protected-access
        assert canvas[0] >= x.shape[0] and canvas[1] >= x.shape[1]
        assert canvas[0] % 32 == 0 and canvas[1] % 32 == 0
        canvases[kind].add(canvas)
    short, top = round_up(size), round_up(1333 * size / 800)
    assert canvases["usual"] <= {(short, top), (top, short), (short, short)}, (size, canvases)
    [(h, w)] = canvases["wide"]
    assert h == short and top < w <= round_up(1.5 * 1333 * size / 800), (size, canvases)


def test_box_only_model_with_tta():
  """A model without a mask head: merged boxes only; one view is the plain Predictor."""
  import jax  # pylint: disable=g-import-not-at-top

  from rethink_jax.models import mask_rcnn  # pylint: disable=g-import-not-at-top

  config = tiny_detector.model_config()
  config.mask_on = False
  model = mask_rcnn.build_model(config)
  batch = {"image": np.zeros((1, 64, 64, 3), np.float32), "image_hw": np.array([[64, 64]])}
  keys = jax.random.split(jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 31))), 2)
  variables = jax.jit(lambda k: model.init({"params": k[0], "sampling": k[1]}, batch))(keys)
  with_tta = predict.Predictor(variables, config, tta={"min_sizes": (64,), "flip": False})
  images = _images(np.random.default_rng(), [(48, 64)])
  [got], [want] = with_tta(images), predict.Predictor(variables, config)(images)
  assert "masks" not in got and len(got["scores"]) == len(want["scores"]) > 0
  np.testing.assert_array_equal(got["labels"], want["labels"])
  np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5)
  np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-3)
  assert with_tta.compilations == 2  # detect, merge
