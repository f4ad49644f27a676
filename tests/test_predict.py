"""predict.py: resize rules against torchvision / Detectron2's formula, the Predictor on a tiny
saved detector (buckets, compilations, equality with a direct model.apply), and the CLI."""

import json
import os

import numpy as np
import pytest

from rethink_jax import detector_checkpoint
from rethink_jax import evaluate
from rethink_jax import predict
from tests import tiny_detector

CLASS_NAMES = tiny_detector.CLASS_NAMES


# ------------------------------------------------------------------------------------------------
# Resize rules.
# ------------------------------------------------------------------------------------------------
def _d2_get_output_shape(oldh, oldw, short_edge_length, max_size):
  """Detectron2's ResizeShortestEdge.get_output_shape, written out from its documented rule."""
  h, w = oldh, oldw
  size = short_edge_length * 1.0
  scale = size / min(h, w)
  if h < w:
    newh, neww = size, scale * w
  else:
    newh, neww = scale * h, size
  if max(newh, neww) > max_size:
    scale = max_size * 1.0 / max(newh, neww)
    newh = newh * scale
    neww = neww * scale
  return int(newh + 0.5), int(neww + 0.5)


def test_detectron2_size_rule():
  rng = np.random.default_rng()
  assert predict.output_size_detectron2(480, 640, 800, 1333) == (800, 1067)
  assert predict.output_size_detectron2(640, 360, 800, 1333) == (1333, 750)
  assert predict.output_size_detectron2(100, 1000, 800, 1333) == (133, 1333)
  for _ in range(2000):
    h, w = (int(v) for v in rng.integers(1, 3000, 2))
    short = int(rng.choice([640, 672, 800, 1024, 64]))
    max_size = int(rng.choice([1000, 1333, 2000, 96]))
    assert predict.output_size_detectron2(h, w, short, max_size) == _d2_get_output_shape(
      h, w, short, max_size
    ), (h, w, short, max_size)


def test_torchvision_resize_matches_generalized_rcnn_transform():
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection.transform import GeneralizedRCNNTransform  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng()
  mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
  config = predict.default_input_config()
  config.update(
    format="RGB",
    pixel_mean=tuple(255 * m for m in mean),
    pixel_std=tuple(255 * s for s in std),
    resize="torchvision",
  )
  sizes = [(37, 53), (120, 61), (83, 83), (20, 150)] + [
    tuple(int(v) for v in rng.integers(8, 200, 2)) for _ in range(4)
  ]
  for min_size, max_size in ((100, 160), (64, 96), (300, 333)):
    config.update(min_size_test=min_size, max_size_test=max_size)
    tv = GeneralizedRCNNTransform(min_size, max_size, mean, std).eval()
    for h, w in sizes:
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      with torch.no_grad():
        batch, _ = tv([torch.from_numpy(image).permute(2, 0, 1).float() / 255])
      th, tw = batch.image_sizes[0]
      ref = batch.tensors[0, :, :th, :tw].permute(1, 2, 0).numpy()
      ours = predict.preprocess(image, config, resize=True)
      assert ours.shape == ref.shape, (h, w, min_size, max_size)
      assert predict.output_size_torchvision(h, w, min_size, max_size) == (th, tw)
      np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=str((h, w, min_size, max_size)))


def test_detectron2_resize_is_pil_then_normalise():
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng()
  config = predict.default_input_config()
  config.update(min_size_test=64, max_size_test=90)
  image = rng.integers(0, 256, (37, 71, 3), dtype=np.uint8)
  ours = predict.preprocess(image, config, resize=True)
  new_h, new_w = _d2_get_output_shape(37, 71, 64, 90)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), np.float32)
  bgr = resized[..., ::-1]
  ref = (bgr - np.asarray(config.pixel_mean)) / np.asarray(config.pixel_std)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-4)
  np.testing.assert_array_equal(predict.preprocess(image, config, resize=False).shape, (37, 71, 3))


def test_buckets_cover_the_resized_coco_sizes():
  config = predict.default_input_config()  # 800 / 1333, divisibility 32
  assert predict.bucket_sides(config) == (64, 128, 224, 416, 800, 1344)
  got = set()
  for h, w in ((480, 640), (640, 480), (427, 640), (612, 612), (375, 500), (640, 360), (500, 333)):
    nh, nw = predict.output_size_detectron2(h, w, 800, 1333)
    canvas = predict.canvas_for(nh, nw, config)
    assert canvas[0] >= nh and canvas[1] >= nw and canvas[0] % 32 == 0 and canvas[1] % 32 == 0
    got.add(canvas)
  assert got == {(800, 1344), (1344, 800), (800, 800)}
  assert predict.canvas_for(2000, 30, config) == (2016, 64)  # above the ladder: its own size


# ------------------------------------------------------------------------------------------------
# The Predictor on a tiny saved detector.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
  return tiny_detector.save(str(tmp_path_factory.mktemp("tiny_detector")))[0]


@pytest.fixture(scope="module")
def predictor(detector_dir):
  return predict.Predictor.from_checkpoint(detector_dir)


def _images(rng, sizes):
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_predictor_outputs_and_buckets(predictor):
  rng = np.random.default_rng()
  # Resized to 64 x 85, 64 x 96 (landscape: bucket 64 x 96) and 96 x 53 (portrait: 96 x 64).
  sizes = [(48, 64), (40, 60), (90, 50)]
  outs = predictor(_images(rng, sizes))
  assert predictor.compilations == 2
  b = predictor.batch_size
  assert predictor.compiled_shapes == [(b, 64, 96, 3), (b, 96, 64, 3)]
  for (h, w), out in zip(sizes, outs):
    n = len(out["scores"])
    assert 0 < n <= predictor.model_config.roi_heads.detections_per_image
    assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == np.float32
    assert out["masks"].shape == (n, h, w) and out["masks"].dtype == bool
    assert out["labels"].shape == (n,) and set(out["labels"].tolist()) <= {0, 1, 2}
    assert out["names"] == [CLASS_NAMES[k] for k in out["labels"]]
    assert np.all(np.diff(out["scores"]) <= 0)
    b = out["boxes"]
    assert np.all(b >= 0) and np.all(b[:, [0, 2]] <= w) and np.all(b[:, [1, 3]] <= h)
    assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
  # New sizes that resize into the same buckets compile nothing.
  predictor(_images(rng, [(30, 41), (100, 57)]))
  assert predictor.compilations == 2


def test_predictor_without_resize_equals_model_apply(predictor):
  """resize=False: the image padded into its bucket, exactly what model.apply computes there."""
  import jax  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng()
  h, w = 57, 83  # bucket 64 x 96, compiled already by the test above or now
  [image] = _images(rng, [(h, w)])
  [out] = predictor([image], resize=False)
  c = predictor.model_config
  x = (image[..., ::-1].astype(np.float32) - np.asarray(c.input.pixel_mean, np.float32)) / (
    np.asarray(c.input.pixel_std, np.float32)
  )
  batch = {"image": np.zeros((1, 64, 96, 3), np.float32), "image_hw": np.array([[h, w]], np.int32)}
  batch["image"][0, :h, :w] = x
  ref = jax.device_get(
    jax.jit(lambda v, b: predictor.model.apply(v, b, train=False))(predictor.variables, batch)
  )
  n = int(ref["num_detections"][0])
  assert n > 0
  valid = np.asarray(ref["classes"][0, :n]) > 0
  order = np.argsort(-np.asarray(ref["scores"][0, :n])[valid], kind="stable")
  boxes = np.asarray(ref["boxes"][0, :n])[valid][order]
  np.testing.assert_allclose(out["boxes"], np.clip(boxes, 0, [w, h, w, h]), atol=1e-4)
  np.testing.assert_allclose(
    out["scores"], np.asarray(ref["scores"][0, :n])[valid][order], atol=1e-6
  )
  np.testing.assert_array_equal(out["labels"], np.asarray(ref["classes"][0, :n])[valid][order] - 1)
  masks = np.asarray(ref["masks"][0, :n])[valid][order]
  pasted = evaluate.paste_masks(masks, out["boxes"], (h, w)).transpose(2, 0, 1).astype(bool)
  np.testing.assert_array_equal(out["masks"], pasted)


def test_cli_writes_results_and_pngs(detector_dir, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng()
  in_dir, out_dir = tmp_path / "images", tmp_path / "out"
  in_dir.mkdir()
  sizes = [(48, 64), (90, 50), (40, 60)]
  for i, image in enumerate(_images(rng, sizes)):
    Image.fromarray(image).save(in_dir / f"{i * 7 + 3:012d}.png")
  (in_dir / "notes.txt").write_text("not an image")
  assert (
    predict.main(
      [
        "--checkpoint",
        detector_dir,
        "--input",
        str(in_dir),
        "--output",
        str(out_dir),
        "--score-thresh",
        "0.2",
      ]
    )
    == 0
  )
  results = json.loads((out_dir / "results.json").read_text())
  assert results and {r["image_id"] for r in results} <= {3, 10, 17}
  for r in results:
    assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert r["category_id"] in (0, 1, 2) and r["score"] >= 0.2
  images = json.loads((out_dir / "images.json").read_text())
  assert [(im["id"], im["height"], im["width"]) for im in images] == [
    (3, 48, 64),
    (10, 90, 50),
    (17, 40, 60),
  ]
  for i, (h, w) in enumerate(sizes):
    png = out_dir / f"{i * 7 + 3:012d}.png"
    assert np.asarray(Image.open(png)).shape == (h, w, 3)
  assert sorted(os.listdir(out_dir)) == sorted(
    ["results.json", "images.json"] + [f"{i * 7 + 3:012d}.png" for i in range(3)]
  )


def test_pipeline_resize_rule_matches_tf():
  """ "rethink_jax": the input pipeline's size rule and tf.image.resize of the normalised image."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng()
  config = predict.default_input_config()
  config.update(resize="rethink_jax", format="RGB", min_size_test=64, max_size_test=100)
  config.update(pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375))
  for h, w in [(37, 53), (120, 61), (83, 83)] + [
    tuple(int(v) for v in rng.integers(8, 200, 2)) for _ in range(3)
  ]:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    scale = min(64 / min(h, w), 100 / max(h, w))
    size = (int(np.round(h * np.float32(scale))), int(np.round(w * np.float32(scale))))
    x = (image.astype(np.float32) - np.asarray(config.pixel_mean, np.float32)) / np.asarray(
      config.pixel_std, np.float32
    )
    ref = tf.image.resize(x, size, method="bilinear").numpy()
    ours = predict.preprocess(image, config, resize=True)
    assert ours.shape == ref.shape, (h, w)
    # tf rounds the source coordinate in float32 (torch's kernel, which ours follows, in float64).
    np.testing.assert_allclose(ours, ref, atol=5e-5, err_msg=str((h, w)))


def test_from_training_workdir(detector_dir, tmp_path):
  """A training workdir (train.py's config.json + orbax checkpoints/STEP) gives the model, the
  data config's input normalisation and the data set's class names."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from configs import tiny_shapes  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  data_dir = str(tmp_path / "tfds")
  shapes.ShapesInstances(config="tiny", data_dir=data_dir).download_and_prepare()
  variables, _, _ = detector_checkpoint.load_detector(detector_dir)
  config = tiny_shapes.get_config()
  config.model = tiny_detector.model_config()
  config.data.data_dir = data_dir
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
  collections = {k: v for k, v in variables.items() if k != "params"}
  state = {
    "step": np.int32(4),
    "rng": np.zeros(2, np.uint32),
    "params": variables["params"],
    "opt_state": {"momentum": variables["params"]},
    "collections": collections,
    "bad_step": np.int32(-1),
  }
  mngr = ocp.CheckpointManager(
    str(workdir / "checkpoints"),
    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
  )
  mngr.save(4, args=ocp.args.StandardSave(state))
  mngr.wait_until_finished()
  mngr.close()
  loaded, model_config, meta = predict.load_workdir(str(workdir))
  flat = lambda t: {k: np.asarray(v) for k, v in _flatten(t).items()}
  assert flat(loaded).keys() == flat(variables).keys()
  for k, v in flat(variables).items():
    np.testing.assert_array_equal(flat(loaded)[k], v, err_msg=k)
  assert model_config.num_classes == 3 and model_config.backbone.width == 8
  assert model_config.input.format == config.data.input_format
  np.testing.assert_allclose(model_config.input.pixel_mean, config.data.pixel_mean)
  np.testing.assert_allclose(model_config.input.pixel_std, config.data.pixel_std)
  assert (model_config.input.min_size_test, model_config.input.max_size_test) == (64, 64)
  assert model_config.input.resize == "rethink_jax" and meta["step"] == 4
  builder = shapes.ShapesInstances(config="tiny", data_dir=data_dir)
  names = [c["name"] for c in builder.info.metadata["categories"]]
  assert meta["class_names"] == names and len(names) == 3
  p = predict.Predictor.from_checkpoint(str(workdir))
  assert p.class_names == meta["class_names"] and p.compilations == 0


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}"))
    return out
  return {prefix: tree}


def test_padding_modes_choose_canvases(predictor, monkeypatch):
  """Which batches reach the model: buckets filled to batch_size, own sizes, one batch."""
  rng = np.random.default_rng()
  calls = []

  def fake_run(images, image_hw):
    calls.append((images.shape, image_hw.tolist()))
    b, d = len(images), predictor.model_config.roi_heads.detections_per_image
    return {
      "boxes": np.zeros((b, d, 4), np.float32),
      "scores": np.zeros((b, d), np.float32),
      "classes": np.zeros((b, d), np.int32),
      "masks": np.zeros((b, d, 28, 28), np.float32),
      "num_detections": np.zeros(b, np.int32),
    }

  monkeypatch.setattr(predictor, "_run", fake_run)
  images = _images(rng, [(50, 70), (20, 30), (90, 40), (60, 33)])
  monkeypatch.setattr(predictor, "batch_size", 2)
  outs = predictor(images, resize=False)
  assert [o["masks"].shape for o in outs] == [(0, 50, 70), (0, 20, 30), (0, 90, 40), (0, 60, 33)]
  assert calls == [
    ((2, 64, 96, 3), [[50, 70], [50, 70]]),  # alone in its bucket: filled with itself
    ((2, 64, 64, 3), [[20, 30], [60, 33]]),
    ((2, 96, 64, 3), [[90, 40], [90, 40]]),
  ]
  calls.clear()
  monkeypatch.setattr(predictor, "padding", "image")
  predictor(images[:2], resize=False)
  assert [c[0] for c in calls] == [(2, 64, 96, 3), (2, 32, 32, 3)]
  calls.clear()
  monkeypatch.setattr(predictor, "padding", "batch")
  predictor(images, resize=False)
  assert calls == [((4, 96, 96, 3), [[50, 70], [20, 30], [90, 40], [60, 33]])]


def test_coco_results_use_the_data_sets_category_ids():
  """Labels 0..K-1 of a custom data set map to its own (non-contiguous) category ids."""
  rng = np.random.default_rng()
  n = 4
  labels = rng.integers(0, 3, n)
  ids = sorted(rng.choice(np.arange(1, 100), 3, replace=False).tolist())
  result = {
    "boxes": np.sort(rng.uniform(0, 30, (n, 4)), axis=1).astype(np.float32),
    "scores": np.sort(rng.uniform(size=n))[::-1],
    "labels": labels,
    "masks": rng.uniform(size=(n, 32, 40)) > 0.5,
  }
  assert [r["category_id"] for r in predict.to_coco(result, 7)] == labels.tolist()
  mapped = predict.to_coco(result, 7, ids)
  assert [r["category_id"] for r in mapped] == [ids[k] for k in labels]
  assert all(r["image_id"] == 7 for r in mapped)


# ------------------------------------------------------------------------------------------------
# A keypoint model (no mask head) through the Predictor and the command line.
# ------------------------------------------------------------------------------------------------
def test_keypoint_predictor_and_coco_results(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from rethink_jax.models import mask_rcnn  # pylint: disable=g-import-not-at-top

  config = tiny_detector.model_config()
  config.mask_on, config.keypoint_on = False, True
  config.keypoint_head.update(num_keypoints=5, conv_dims=(16, 16), max_fg_rois=4, chunk_rois=0)
  model = mask_rcnn.build_model(config)
  batch = {"image": np.zeros((1, 64, 64, 3), np.float32), "image_hw": np.array([[64, 64]])}
  keys = jax.random.split(jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 31))), 2)
  variables = jax.jit(lambda k: model.init({"params": k[0], "sampling": k[1]}, batch))(keys)
  meta = {"source": "test", "sha256": None, "class_names": CLASS_NAMES}
  directory = detector_checkpoint.save_detector(str(tmp_path / "kp"), variables, config, meta)
  predictor = predict.Predictor.from_checkpoint(directory)

  rng = np.random.default_rng()
  h, w = 45, 60  # resized (Detectron2's rule) to 64 x 85: keypoints scale back by 60/85, 45/64
  [image] = _images(rng, [(h, w)])
  [out] = predictor([image])
  n = len(out["scores"])
  assert n > 0 and "masks" not in out
  assert out["keypoints"].shape == (n, 5, 3) and out["keypoints"].dtype == np.float32
  # The model's own keypoints on the resized image, mapped back as the resize rule says.
  prepared = predict.preprocess(image, predictor.model_config.input, True)
  assert prepared.shape[:2] == (64, 85)
  ref = predictor.run_padded([prepared], (64, 96))
  m = int(ref["num_detections"][0])
  valid = np.asarray(ref["classes"][0, :m]) > 0
  order = np.argsort(-np.asarray(ref["scores"][0, :m])[valid], kind="stable")
  want = np.asarray(ref["keypoints"][0, :m])[valid][order]
  assert len(want) == n
  np.testing.assert_allclose(out["keypoints"][..., 2], want[..., 2], atol=1e-6)
  np.testing.assert_allclose(
    out["keypoints"][..., :2], want[..., :2] * np.array([60 / 85, 45 / 64]), atol=1e-4
  )

  [entry, *_] = predict.to_coco(out, 7)
  assert "segmentation" not in entry and len(entry["keypoints"]) == 15
  np.testing.assert_allclose(
    np.reshape(entry["keypoints"], (5, 3))[:, :2], out["keypoints"][0, :, :2] - 0.5, atol=1e-5
  )
  Image.fromarray(image).save(tmp_path / "000000000007.png")
  argv = ["--checkpoint", directory, "--input", str(tmp_path / "000000000007.png")]
  assert predict.main(argv + ["--output", str(tmp_path / "out"), "--score-thresh", "0"]) == 0
  results = json.loads((tmp_path / "out" / "results.json").read_text())
  assert results and all(len(r["keypoints"]) == 15 for r in results)
  assert np.asarray(Image.open(tmp_path / "out" / "000000000007.png")).shape == (h, w, 3)
