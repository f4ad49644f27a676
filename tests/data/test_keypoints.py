"""Keypoint data: shapes_keypoints and coco_instances records, metadata and ground truth against
pycocotools (COCO() loads it, COCOeval's keypoint AP of the ground truth as detections is 1),
bad keypoint annotations, and the pipeline's gt_keypoints against a NumPy transcription of
Detectron2's loading (+0.5), resize, flip and left/right swap."""

import contextlib
import io
import json
import os

import numpy as np
from PIL import Image
from pycocotools import coco as coco_lib
from pycocotools import cocoeval
from pycocotools import mask as mask_utils
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from rethink_jax.data import coco
from rethink_jax.data import instances
from rethink_jax.data import pipeline
from rethink_jax.data import shapes_keypoints
from rethink_jax.data import stream

K = len(shapes_keypoints.KEYPOINT_NAMES)
H, W = 48, 64
# Detectron2's COCO_PERSON_KEYPOINT_FLIP_MAP (detectron2/data/datasets/builtin_meta.py).
D2_COCO_FLIP_MAP = [
  ["left_eye", "right_eye"],
  ["left_ear", "right_ear"],
  ["left_shoulder", "right_shoulder"],
  ["left_elbow", "right_elbow"],
  ["left_wrist", "right_wrist"],
  ["left_hip", "right_hip"],
  ["left_knee", "right_knee"],
  ["left_ankle", "right_ankle"],
]


def _quiet(fn, *args):
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*args)


def _keypoint_ap(gt, results, sigmas, cat_ids=None):
  """COCOeval iouType "keypoints" AP (stats[0]) of `results` with the given OKS sigmas."""
  dt = _quiet(gt.loadRes, results)
  ev = cocoeval.COCOeval(gt, dt, "keypoints")
  ev.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
  if cat_ids is not None:
    ev.params.catIds = cat_ids
  for step in (ev.evaluate, ev.accumulate, ev.summarize):
    _quiet(step)
  return float(ev.stats[0])


def _gt_as_detections(gt, rng, shift=0.0):
  """Every non-crowd annotation with labeled keypoints as a detection (keypoints moved by shift
  pixels in a random direction per point)."""
  results = []
  for ann in gt.anns.values():
    if ann["iscrowd"] or not ann["num_keypoints"]:
      continue
    kp = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
    angle = rng.uniform(0, 2 * np.pi, len(kp))
    kp[:, 0] += shift * np.cos(angle)
    kp[:, 1] += shift * np.sin(angle)
    kp[:, 2] = 1.0
    results.append(
      {
        "image_id": ann["image_id"],
        "category_id": ann["category_id"],
        "keypoints": kp.reshape(-1).tolist(),
        "score": float(rng.uniform(0.5, 1.0)),
      }
    )
  return results


def _records(builder, split):
  source = pipeline._data_source(builder, split)
  return [
    tfds.as_numpy(builder.info.features.deserialize_example(source[i])) for i in range(len(source))
  ]


# ---------------------------------------------------------------------------------------------
# shapes_keypoints.
# ---------------------------------------------------------------------------------------------
def test_shapes_keypoints_metadata_records_and_json_agree(keypoints_dir):
  b = shapes_keypoints.ShapesKeypoints(config="tiny", data_dir=keypoints_dir)
  meta = b.info.metadata
  assert meta["categories"] == [{"id": 1, "name": "figure"}]
  assert meta["keypoint_names"] == list(shapes_keypoints.KEYPOINT_NAMES)
  assert meta["keypoint_flip_map"] == [["left_hand", "right_hand"], ["left_foot", "right_foot"]]
  assert meta["skeleton"] == [list(p) for p in shapes_keypoints.SKELETON]
  assert len(meta["keypoint_oks_sigmas"]) == K
  seen_v = set()
  for split in ("train", "validation"):
    gt = _quiet(coco_lib.COCO, os.path.join(b.data_dir, "annotations", f"{split}.json"))
    assert gt.cats[1]["keypoints"] == meta["keypoint_names"]
    assert gt.cats[1]["skeleton"] == meta["skeleton"]
    counts = pipeline.records_meta(b, split)["num_keypoints"]
    for i, r in enumerate(_records(b, split)):
      anns = gt.imgToAnns[int(r["image_id"])]
      assert [a["id"] for a in anns] == r["objects"]["id"].tolist()
      kp = r["keypoints"].reshape(-1, K, 3)
      assert kp.shape[0] == len(anns)
      assert counts[i] == (kp[..., 2] > 0).sum()
      for a, k in zip(anns, kp):
        np.testing.assert_array_equal(np.reshape(a["keypoints"], (K, 3)), k)
        assert a["num_keypoints"] == (k[:, 2] > 0).sum()
        mask = mask_utils.decode(a["segmentation"])
        x, y, v = k[:, 0].astype(int), k[:, 1].astype(int), k[:, 2]
        # v = 2: the keypoint's pixel shows its figure; v = 1: something is painted over it.
        assert (mask[y[v == 2], x[v == 2]] == 1).all(), a["id"]
        assert (mask[y[v == 1], x[v == 1]] == 0).all(), a["id"]
        assert (k[v == 0] == 0).all()
        seen_v |= set(v.tolist())
  assert seen_v == {0.0, 1.0, 2.0}  # all three visibilities occur in the tiny set


def test_shapes_keypoints_gt_as_detections_scores_ap_one(keypoints_dir):
  b = shapes_keypoints.ShapesKeypoints(config="tiny", data_dir=keypoints_dir)
  gt = _quiet(coco_lib.COCO, os.path.join(b.data_dir, "annotations", "validation.json"))
  sigmas = b.info.metadata["keypoint_oks_sigmas"]
  rng = np.random.default_rng()
  assert _keypoint_ap(gt, _gt_as_detections(gt, rng), sigmas) == 1.0
  assert _keypoint_ap(gt, _gt_as_detections(gt, rng, shift=4.0), sigmas) < 0.9


def test_figures_are_deterministic_and_left_limbs_on_the_image_right():
  seed = int(np.random.default_rng().integers(1 << 30))
  a = shapes_keypoints.render_figures(np.random.default_rng(seed), 64)
  b = shapes_keypoints.render_figures(np.random.default_rng(seed), 64)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y, err_msg=f"seed {seed}")
  assert a[0].shape == (64, 64, 3) and a[1].shape[0] == a[2].shape[0] >= 1, f"seed {seed}"
  rng = np.random.default_rng(seed)
  for _ in range(200):
    p = shapes_keypoints.figure_geometry(rng, rng.uniform(20, 100), 50.0, 50.0)["points"]
    names = shapes_keypoints.KEYPOINT_NAMES
    x = dict(zip(names, p[:, 0]))
    assert x["left_hand"] > x["right_hand"] and x["left_foot"] > x["right_foot"], f"seed {seed}"


# ---------------------------------------------------------------------------------------------
# coco_instances with keypoints.
# ---------------------------------------------------------------------------------------------
def _person_keypoints(rng, n_labeled):
  """17 COCO keypoints inside a 48 x 64 image: n_labeled labeled (v 1 or 2), the rest (0, 0, 0)."""
  kp = np.zeros((17, 3), np.int64)
  idx = rng.choice(17, n_labeled, replace=False)
  kp[idx, 0] = rng.integers(0, W, n_labeled)
  kp[idx, 1] = rng.integers(0, H, n_labeled)
  kp[idx, 2] = rng.integers(1, 3, n_labeled)
  return kp


def _keypoint_dataset(rng):
  """Images 1-3 (48 x 64); persons with keypoints, a crowd, one without keypoints, a ball."""
  kp = [_person_keypoints(rng, n) for n in (17, 9, 4)]
  kp[1][3] = [W + 5, 10, 2]  # a labeled point outside the image: made unlabeled, counted
  square = lambda x, y, s: [[x, y, x + s, y, x + s, y + s, x, y + s]]
  person = lambda aid, img, k, **kw: {
    "id": aid,
    "image_id": img,
    "category_id": 1,
    "iscrowd": 0,
    "area": 100.0,
    "bbox": [5, 5, 10, 10],
    "segmentation": square(5, 5, 10),
    "keypoints": k.reshape(-1).tolist(),
    "num_keypoints": int((k[:, 2] > 0).sum()),
    **kw,
  }
  anns = [
    person(10, 1, kp[0]),
    person(11, 1, kp[1]),
    person(12, 2, kp[2]),
    person(13, 2, np.zeros((17, 3), np.int64), iscrowd=1),
    {k: v for k, v in person(14, 3, kp[0]).items() if k not in ("keypoints", "num_keypoints")},
    {
      "id": 15,
      "image_id": 3,
      "category_id": 5,
      "iscrowd": 0,
      "area": 64.0,
      "bbox": [20, 20, 8, 8],
      "segmentation": square(20, 20, 8),
    },
  ]
  cats = [
    {
      "id": 1,
      "name": "person",
      "supercategory": "person",
      "keypoints": list(instances.COCO_PERSON_KEYPOINT_NAMES),
      "skeleton": [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 7]],
    },
    {"id": 5, "name": "ball"},
  ]
  images = [{"id": i, "file_name": f"im{i}.png", "height": H, "width": W} for i in (1, 2, 3)]
  return {"images": images, "annotations": anns, "categories": cats}


@pytest.fixture(scope="module")
def coco_keypoints(tmp_path_factory):
  tfds.disable_progress_bar()
  rng = np.random.default_rng()
  root = tmp_path_factory.mktemp("coco_kp_src")
  data = _keypoint_dataset(rng)
  for im in data["images"]:
    pixels = rng.integers(0, 255, (H, W, 3), np.uint8)
    Image.fromarray(pixels).save(root / im["file_name"])
  (root / "kp.json").write_text(json.dumps(data))
  builder = coco.build_coco_instances(
    str(tmp_path_factory.mktemp("tfds_coco_kp")),
    {"train": (str(root / "kp.json"), str(root)), "validation": (str(root / "kp.json"), str(root))},
    name="kp",
  )
  return builder, data


def test_coco_keypoint_metadata_records_and_drops(coco_keypoints):
  builder, data = coco_keypoints
  meta = builder.info.metadata
  assert meta["keypoint_names"] == list(instances.COCO_PERSON_KEYPOINT_NAMES)
  assert meta["keypoint_flip_map"] == D2_COCO_FLIP_MAP
  assert meta["skeleton"] == data["categories"][0]["skeleton"]
  np.testing.assert_allclose(
    meta["keypoint_oks_sigmas"], cocoeval.Params("keypoints").kpt_oks_sigmas
  )
  assert meta["dropped"]["train"] == {"keypoint_outside_image": 1, "keypoints_missing": 1}
  given = {a["id"]: a for a in data["annotations"]}
  counts = pipeline.records_meta(builder, "train")["num_keypoints"]
  for i, r in enumerate(_records(builder, "train")):
    kp = r["keypoints"].reshape(-1, 17, 3)
    assert len(kp) == len(r["objects"]["id"])
    assert counts[i] == (kp[..., 2] > 0).sum()
    for aid, k in zip(r["objects"]["id"], kp):
      want = np.reshape(given[aid].get("keypoints", [0] * 51), (17, 3)).astype(np.float32)
      if aid == 11:
        want[3] = 0  # outside the image
      np.testing.assert_array_equal(k, want, err_msg=f"annotation {aid}")
  labeled = lambda aid: sum(v > 0 for v in given[aid]["keypoints"][2::3])
  # Image 1 loses the outside point; 13 (crowd) has none, 14 lists none, the ball (15) has none.
  assert counts.tolist() == [labeled(10) + labeled(11) - 1, labeled(12), 0]


def test_coco_keypoint_ground_truth_for_cocoeval(coco_keypoints):
  builder, data = coco_keypoints
  path = os.path.join(builder.data_dir, "annotations", "validation.json")
  gt = _quiet(coco_lib.COCO, path)
  assert gt.cats[1]["keypoints"] == list(instances.COCO_PERSON_KEYPOINT_NAMES)
  for ann in gt.anns.values():  # COCOeval reads both on every annotation
    assert len(ann["keypoints"]) == 51 and ann["num_keypoints"] == sum(
      v > 0 for v in ann["keypoints"][2::3]
    )
  assert gt.anns[11]["keypoints"] == data["annotations"][1]["keypoints"]  # the original kept
  rng = np.random.default_rng()
  sigmas = builder.info.metadata["keypoint_oks_sigmas"]
  assert _keypoint_ap(gt, _gt_as_detections(gt, rng), sigmas, cat_ids=[1]) == 1.0
  assert _keypoint_ap(gt, _gt_as_detections(gt, rng, shift=3.0), sigmas, cat_ids=[1]) < 1.0


def _bad(tmp_path, mutate):
  rng = np.random.default_rng()
  data = _keypoint_dataset(rng)
  mutate(data)
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(data))
  return lambda: coco.parse_annotations(path)


@pytest.mark.parametrize(
  "mutate, message",
  [
    (lambda d: d["annotations"][0]["keypoints"].pop(), r"annotation 10: keypoints have 50 values"),
    (lambda d: d["annotations"][2].update(keypoints=[0] * 48), r"annotation 12: .* 3 \* 17 = 51"),
    (lambda d: d["annotations"][1]["keypoints"].__setitem__(2, 3), r"annotation 11: .* 0, 1 or 2"),
    (lambda d: d["annotations"][1]["keypoints"].__setitem__(5, -1), r"0, 1 or 2, got \[-1"),
    (lambda d: d["annotations"][0]["keypoints"].__setitem__(2, 1.5), r"0, 1 or 2, got .*1\.5"),
    (lambda d: d["annotations"][0]["keypoints"].__setitem__(0, "x"), r"not a list of numbers"),
    (lambda d: d["annotations"][0].update(keypoints={"x": 1}), r"annotation 10: keypoints"),
    (
      lambda d: d["categories"][1].update(keypoints=["a", "b"]),
      r"categories 1 and 5 list different keypoints",
    ),
    (lambda d: d["categories"][0]["skeleton"].append([0, 3]), r"category 1: skeleton .* 1\.\.17"),
  ],
)
def test_bad_keypoint_annotations_name_the_annotation(tmp_path, mutate, message):
  with pytest.raises(ValueError, match=message):
    _bad(tmp_path, mutate)()


def test_non_finite_keypoint_is_an_error(tmp_path):
  data = _keypoint_dataset(np.random.default_rng())
  data["annotations"][0]["keypoints"][0] = float("nan")
  (tmp_path / "nan.json").write_text(json.dumps(data))  # Python's json writes and reads NaN
  with pytest.raises(ValueError, match="annotation 10: keypoints hold a non-finite value"):
    coco.parse_annotations(tmp_path / "nan.json")


def test_flip_indices_follow_detectron2():
  names = list(instances.COCO_PERSON_KEYPOINT_NAMES)
  assert instances.flip_map_from_names(names) == D2_COCO_FLIP_MAP
  flip = instances.flip_indices(names, D2_COCO_FLIP_MAP)
  # Detectron2's create_keypoint_hflip_indices on its COCO metadata.
  assert flip.tolist() == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
  sk = shapes_keypoints
  flip = instances.flip_indices(sk.KEYPOINT_NAMES, sk.KEYPOINT_FLIP_MAP)
  assert flip.tolist() == [0, 1, 3, 2, 4, 6, 5]


# ---------------------------------------------------------------------------------------------
# The pipeline's gt_keypoints.
# ---------------------------------------------------------------------------------------------
def _detectron2_keypoints(kp, scale, new_h, new_w, flip, flip_indices):
  """NumPy transcription of Detectron2's keypoint path: its COCO loader's +0.5, then
  transform_keypoint_annotations with a resize and an optional horizontal flip. kp (n, K, 3)."""
  out = np.zeros(kp.shape, np.float64)
  for i, inst in enumerate(np.asarray(kp, np.float64)):
    k = inst.copy()
    k[:, :2] += 0.5
    xy = k[:, :2] * scale
    if flip:
      xy[:, 0] = new_w - xy[:, 0]
    inside = ((xy >= 0) & (xy <= np.array([new_w, new_h]))).all(axis=1)
    k[:, :2] = xy
    k[~inside, 2] = 0
    if flip:
      k = k[np.asarray(flip_indices)]
    k[k[:, 2] == 0] = 0
    out[i] = k
  return out


def test_transform_keypoints_matches_detectron2_on_random_inputs():
  from rethink_jax.data import preprocess  # pylint: disable=g-import-not-at-top

  seed = int(np.random.default_rng().integers(1 << 30))
  rng = np.random.default_rng(seed)
  flip_indices = instances.flip_indices(
    instances.COCO_PERSON_KEYPOINT_NAMES,
    instances.flip_map_from_names(instances.COCO_PERSON_KEYPOINT_NAMES),
  )
  for _ in range(6):
    h, w = rng.integers(20, 200, 2)
    n = int(rng.integers(0, 5))
    kp = np.zeros((n, 17, 3), np.float32)
    kp[..., 0] = rng.integers(-3, w + 3, (n, 17))  # some outside the image
    kp[..., 1] = rng.integers(-3, h + 3, (n, 17))
    kp[..., 2] = rng.integers(0, 3, (n, 17))
    scale = np.float32(rng.uniform(0.5, 2.0))
    new_h, new_w = int(round(h * scale)), int(round(w * scale))
    for flip in (False, True):
      got = preprocess.transform_keypoints(
        tf.constant(kp), tf.constant(scale), new_h, new_w, tf.constant(flip), flip_indices
      ).numpy()
      want = _detectron2_keypoints(kp, scale, new_h, new_w, flip, flip_indices)
      np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"seed {seed} flip {flip}")


def _keypoint_config(keypoints_dir, **kwargs):
  c = pipeline.default_data_config()
  c.update(
    name="shapes_keypoints",
    data_dir=keypoints_dir,
    builder_config="tiny",
    min_size=80,  # 64 -> 80: scale 1.25
    max_size=96,
    pad_to=(96, 96),
    mask_size=8,
    max_instances=2,
    keypoints=True,
  )
  c.update(kwargs)
  return c


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_training_batches_carry_keypoints_resized_and_flipped(keypoints_dir, flip_prob):
  c = _keypoint_config(keypoints_dir, flip_prob=flip_prob)
  info = pipeline.keypoint_info(c)
  assert info["names"] == list(shapes_keypoints.KEYPOINT_NAMES)
  builder = pipeline.get_builder(c)
  gt = _quiet(coco_lib.COCO, os.path.join(builder.data_dir, "annotations", "train.json"))
  it = stream.make_train_iterator(c, 4, seed=0, process_index=0, process_count=1)
  seen = set()
  for _ in range(6):
    batch = next(it)
    assert batch["gt_keypoints"].shape == (4, 2, K, 3)
    assert batch["gt_keypoints"].dtype == np.float32
    for i, image_id in enumerate(batch["image_id"]):
      seen.add(int(image_id))
      anns = gt.imgToAnns[int(image_id)][:2]
      kp = np.asarray([a["keypoints"] for a in anns], np.float32).reshape(-1, K, 3)
      new_h, new_w = batch["image_hw"][i]
      want = _detectron2_keypoints(
        kp, batch["scale"][i], new_h, new_w, flip_prob == 1.0, info["flip_indices"]
      )
      got = batch["gt_keypoints"][i]
      np.testing.assert_allclose(got[: len(anns)], want, atol=1e-4, err_msg=f"image {image_id}")
      assert (got[len(anns) :] == 0).all()  # padding rows
      assert (batch["gt_classes"][i] > 0).sum() == len(anns)
  assert len(seen) > 12


def test_eval_batches_carry_unflipped_keypoints(keypoints_dir):
  c = _keypoint_config(keypoints_dir)
  info = pipeline.keypoint_info(c)
  gt = pipeline.get_coco_gt(c)
  batches = list(pipeline.make_eval_iterator(c, 3, process_index=0, process_count=1))
  assert len(batches) == 3  # 8 images and one padding image
  for batch in batches:
    for i, image_id in enumerate(batch["image_id"]):
      if not batch["valid"][i]:
        assert (batch["gt_keypoints"][i] == 0).all()
        continue
      anns = gt.imgToAnns[int(image_id)][:2]
      kp = np.asarray([a["keypoints"] for a in anns], np.float32).reshape(-1, K, 3)
      h, w = batch["image_hw"][i]
      want = _detectron2_keypoints(kp, batch["scale"][i], h, w, False, info["flip_indices"])
      np.testing.assert_allclose(batch["gt_keypoints"][i][: len(anns)], want, atol=1e-4)


def test_min_keypoints_per_image_filters_training_images(keypoints_dir):
  c = _keypoint_config(keypoints_dir)
  builder = pipeline.get_builder(c)
  meta = pipeline.records_meta(builder, "train")
  assert pipeline.train_pool(c).tolist() == np.flatnonzero(meta["num_objects"] > 0).tolist()
  threshold = int(np.median(meta["num_keypoints"]))
  c.min_keypoints_per_image = threshold
  pool = pipeline.train_pool(c)
  assert pool.tolist() == np.flatnonzero(meta["num_keypoints"] >= threshold).tolist()
  assert 0 < len(pool) < len(meta["num_keypoints"])
  c.keypoints = False  # the filter belongs to keypoint training only
  assert len(pipeline.train_pool(c)) == (meta["num_objects"] > 0).sum()


def test_resolve_keypoints_checks_the_model_against_the_data(keypoints_dir, shapes_dir):
  import ml_collections  # pylint: disable=g-import-not-at-top

  from rethink_jax.data import recipe  # pylint: disable=g-import-not-at-top

  def config(num_keypoints, data):
    head = dict(num_keypoints=num_keypoints, min_keypoints_per_image=3)
    model = dict(keypoint_on=True, keypoint_head=head)
    return ml_collections.ConfigDict(dict(model=model, data=data))

  data = _keypoint_config(keypoints_dir, keypoints=False)
  c = config(0, data)
  recipe.resolve_keypoints(c, pipeline.get_builder(data))
  assert c.data.keypoints and c.model.keypoint_head.num_keypoints == K
  assert c.data.min_keypoints_per_image == 3
  with pytest.raises(recipe.KeypointCountMismatchError, match="num_keypoints=7"):
    recipe.resolve_keypoints(config(17, data), pipeline.get_builder(data))
  plain = pipeline.default_data_config()
  plain.update(data_dir=shapes_dir, builder_config="tiny")
  with pytest.raises(ValueError, match="has none"):
    recipe.resolve_keypoints(config(0, plain), pipeline.get_builder(plain))


def test_records_without_the_keypoints_field_read_as_empty():
  """Records built before the keypoints field existed still decode (K = 0 data sets)."""
  full = instances.instance_features()
  older = tfds.features.FeaturesDict({k: v for k, v in full.items() if k != "keypoints"})
  example = {
    "image": np.zeros((4, 4, 3), np.uint8),
    "image_id": 1,
    "file_name": "a.png",
    "height": 4,
    "width": 4,
    "objects": [],
    "mask_counts": np.zeros((0,), np.int32),
  }
  ex = full.deserialize_example(older.serialize_example(example))
  assert ex["keypoints"].shape == (0,) and int(ex["image_id"]) == 1


def test_coco_keypoint_batches_drop_crowds_and_match_detectron2(coco_keypoints):
  builder, data = coco_keypoints
  c = pipeline.default_data_config()
  c.update(
    name="coco_instances",
    data_dir=builder.data_dir_root,
    builder_config="kp",
    min_size=72,
    max_size=96,
    pad_to=(64, 96),
    mask_size=8,
    max_instances=3,
    keypoints=True,
  )
  flip = pipeline.keypoint_info(c)["flip_indices"]
  rows = {1: [10, 11], 2: [12], 3: [14, 15]}  # crowd 13 dropped; 14, 15 without keypoints
  given = {a["id"]: a for a in data["annotations"]}
  seen = set()
  for batch in pipeline.make_eval_iterator(c, 2, process_index=0, process_count=1):
    for i, image_id in enumerate(batch["image_id"][batch["valid"]]):
      seen.add(int(image_id))
      kp = np.asarray(
        [given[a].get("keypoints", [0] * 51) for a in rows[int(image_id)]], np.float32
      ).reshape(-1, 17, 3)
      h, w = batch["image_hw"][i]
      want = _detectron2_keypoints(kp, batch["scale"][i], h, w, False, flip)
      got = batch["gt_keypoints"][i]
      assert got.shape == (3, 17, 3)
      np.testing.assert_allclose(got[: len(kp)], want, atol=1e-4, err_msg=f"image {image_id}")
      assert (got[len(kp) :] == 0).all()
  assert seen == {1, 2, 3}
