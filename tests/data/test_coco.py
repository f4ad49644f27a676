"""coco_instances from a small COCO-format data set written here; every bad-input case."""

import copy
import json
import os

import numpy as np
from PIL import Image
from pycocotools import coco as coco_lib
from pycocotools import mask as mask_utils
import pytest
import tensorflow_datasets as tfds

from rethink_jax.data import coco
from rethink_jax.data import instances
from rethink_jax.data import pipeline
from rethink_jax.data import stream

H, W = 48, 64


def _rle(mask, compressed):
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  if compressed:
    rle["counts"] = rle["counts"].decode()
    return rle
  counts = instances.mask_to_counts(mask).tolist()
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _write_dataset(root):
  """Images: 1 RGB JPEG, 2 grayscale JPEG, 3 PNG (RGBA), 4 no annotations, 5 RGB JPEG."""
  rng = np.random.default_rng(0)
  img_dir = os.path.join(root, "images")
  os.makedirs(img_dir, exist_ok=True)
  images = []
  for i, (fmt, mode) in enumerate(
    [("jpg", "RGB"), ("jpg", "L"), ("png", "RGBA"), ("jpg", "RGB"), ("jpg", "RGB")], start=1
  ):
    arr = rng.integers(0, 255, (H, W, {"RGB": 3, "L": 1, "RGBA": 4}[mode]), np.uint8)
    Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode).save(
      os.path.join(img_dir, f"im{i}.{fmt}")
    )
    images.append({"id": i, "file_name": f"im{i}.{fmt}", "height": H, "width": W})
  yy, xx = np.mgrid[0:H, 0:W]
  disk = ((yy - 20) ** 2 + (xx - 30) ** 2 <= 100).astype(np.uint8)
  square = ((yy >= 5) & (yy < 15) & (xx >= 40) & (xx < 60)).astype(np.uint8)
  anns = [
    # polygon (a triangle) on image 1
    {
      "id": 10,
      "image_id": 1,
      "category_id": 3,
      "iscrowd": 0,
      "area": 150.0,
      "bbox": [10, 10, 20, 15],
      "segmentation": [[10, 10, 30, 10, 10, 25]],
    },
    # compressed RLE on image 1, uncompressed RLE on image 2
    {
      "id": 11,
      "image_id": 1,
      "category_id": 7,
      "iscrowd": 0,
      "area": float(disk.sum()),
      "bbox": [20, 10, 21, 21],
      "segmentation": _rle(disk, True),
    },
    {
      "id": 12,
      "image_id": 2,
      "category_id": 7,
      "iscrowd": 0,
      "area": float(square.sum()),
      "bbox": [40, 5, 20, 10],
      "segmentation": _rle(square, False),
    },
    # crowd (uncompressed RLE, as in COCO) on image 3
    {
      "id": 13,
      "image_id": 3,
      "category_id": 3,
      "iscrowd": 1,
      "area": float(disk.sum()),
      "bbox": [20, 10, 21, 21],
      "segmentation": _rle(disk, False),
    },
    {
      "id": 14,
      "image_id": 3,
      "category_id": 3,
      "iscrowd": 0,
      "area": float(square.sum()),
      "bbox": [40, 5, 20, 10],
      "segmentation": _rle(square, True),
    },
    # partly outside: clipped and kept
    {
      "id": 15,
      "image_id": 5,
      "category_id": 3,
      "iscrowd": 0,
      "area": 100.0,
      "bbox": [54, 38, 20, 20],
      "segmentation": [[54, 38, 64, 38, 64, 48, 54, 48]],
    },
    # documented drops: zero area box, box outside the image, empty segmentations
    {
      "id": 16,
      "image_id": 5,
      "category_id": 3,
      "iscrowd": 0,
      "area": 0.0,
      "bbox": [5, 5, 0, 4],
      "segmentation": [[5, 5, 5, 9, 5, 9]],
    },
    {
      "id": 17,
      "image_id": 5,
      "category_id": 3,
      "iscrowd": 0,
      "area": 10.0,
      "bbox": [70, 50, 5, 5],
      "segmentation": [[70, 50, 75, 50, 75, 55]],
    },
    {
      "id": 18,
      "image_id": 5,
      "category_id": 7,
      "iscrowd": 0,
      "area": 10.0,
      "bbox": [5, 5, 5, 5],
      "segmentation": [],
    },
    {
      "id": 19,
      "image_id": 5,
      "category_id": 7,
      "iscrowd": 0,
      "area": 10.0,
      "bbox": [5, 5, 5, 5],
      "segmentation": [[5, 5, 9, 9]],
    },
  ]
  cats = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
  data = {"images": images, "annotations": anns, "categories": cats}
  with open(os.path.join(root, "train.json"), "w") as f:
    json.dump(data, f)
  val = {
    "images": images[:4],
    "annotations": [a for a in anns if a["image_id"] <= 4],
    "categories": cats,
  }
  with open(os.path.join(root, "val.json"), "w") as f:
    json.dump(val, f)
  return data


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  root = str(tmp_path_factory.mktemp("coco_src"))
  data = _write_dataset(root)
  data_dir = str(tmp_path_factory.mktemp("tfds_coco"))
  img = os.path.join(root, "images")
  builder = coco.build_coco_instances(
    data_dir,
    {
      "train": (os.path.join(root, "train.json"), img),
      "validation": (os.path.join(root, "val.json"), img),
    },
    name="mini",
  )
  return root, data_dir, builder, data


def _records(builder, split):
  source = pipeline._data_source(builder, split)
  return [
    tfds.as_numpy(builder.info.features.deserialize_example(source[i])) for i in range(len(source))
  ]


def test_records_masks_and_drops(coco_dir):
  root, _, builder, data = coco_dir
  assert builder.info.metadata["categories"] == [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
  assert builder.info.metadata["dropped"]["train"] == {
    "box_clipped": 1,
    "box_outside_image": 1,
    "empty_segmentation": 2,
    "zero_area_box": 1,
  }
  recs = _records(builder, "train")
  assert [int(r["image_id"]) for r in recs] == [1, 2, 3, 4, 5]  # image 4 kept without objects
  gt = coco_lib.COCO(os.path.join(root, "train.json"))
  kept = set()
  for r in recs:
    assert r["image"].shape == (H, W, 3)  # grayscale and RGBA come out as RGB
    objs = r["objects"]
    counts = np.split(r["mask_counts"], np.cumsum(objs["mask_runs"])[:-1])
    for k, aid in enumerate(objs["id"]):
      kept.add(int(aid))
      ann = gt.anns[int(aid)]
      np.testing.assert_array_equal(
        instances.counts_to_mask(counts[k], H, W), gt.annToMask(ann), err_msg=f"annotation {aid}"
      )
      assert objs["category_id"][k] == ann["category_id"]
      assert objs["label"][k] == {3: 0, 7: 1}[ann["category_id"]]
      assert objs["is_crowd"][k] == bool(ann["iscrowd"])
      ymin, xmin, ymax, xmax = objs["bbox"][k] * [H, W, H, W]
      x, y, w, h = ann["bbox"]
      np.testing.assert_allclose(
        [xmin, ymin, xmax, ymax], [x, y, min(x + w, W), min(y + h, H)], atol=1e-3
      )
  assert kept == {10, 11, 12, 13, 14, 15}
  meta = pipeline.records_meta(builder, "train")
  assert meta["num_objects"].tolist() == [2, 1, 1, 0, 1]  # crowd not counted
  # Ground truth JSON for evaluation: validation only by default, original annotations.
  assert os.path.exists(os.path.join(builder.data_dir, "annotations", "validation.json"))
  assert not os.path.exists(os.path.join(builder.data_dir, "annotations", "train.json"))


def test_pipeline_on_coco(coco_dir):
  _, data_dir, _, _ = coco_dir
  c = pipeline.default_data_config()
  c.update(
    name="coco_instances",
    data_dir=data_dir,
    builder_config="mini",
    min_size=64,
    max_size=96,
    pad_to=(64, 96),
    max_instances=4,
    mask_size=16,
  )
  assert pipeline.category_ids(c) == [3, 7]
  it = stream.make_train_iterator(c, 2, seed=0, process_index=0, process_count=1)
  ids = set()
  for _ in range(4):
    batch = next(it)
    ids |= set(batch["image_id"].tolist())
    assert batch["image"].shape == (2, 64, 96, 3)
    # Image 3 has a crowd and a normal instance: only the normal one is a target.
    for k in np.flatnonzero(batch["image_id"] == 3):
      assert (batch["gt_classes"][k] > 0).sum() == 1
  assert ids == {1, 2, 3, 5}  # image 4 (no annotations) never in training
  ev = list(pipeline.make_eval_iterator(c, 3, process_index=0, process_count=1))
  assert sorted(np.concatenate([b["image_id"][b["valid"]] for b in ev]).tolist()) == [1, 2, 3, 4]
  gt = pipeline.get_coco_gt(c)
  assert sorted(gt.getImgIds()) == [1, 2, 3, 4] and 13 in gt.anns and gt.anns[13]["iscrowd"] == 1


def _build_bad(tmp_path, data, mutate_files=None, **kwargs):
  root = tmp_path / "src"
  img = root / "images"
  img.mkdir(parents=True)
  for i in range(1, 6):
    src = [im for im in data["images"] if im["id"] == i][0]["file_name"]
    # Reuse tiny valid images.
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(img / src)
  if mutate_files:
    mutate_files(img)
  ann = root / "train.json"
  ann.write_text(json.dumps(data))
  return coco.build_coco_instances(
    str(tmp_path / "tfds"), {"train": (str(ann), str(img))}, name="bad", **kwargs
  )


def test_unknown_image_and_category(coco_dir, tmp_path):
  data = copy.deepcopy(coco_dir[3])
  data["annotations"][2]["image_id"] = 99
  with pytest.raises(ValueError, match="annotation 12 refers to unknown image id 99"):
    _build_bad(tmp_path / "a", data)
  data = copy.deepcopy(coco_dir[3])
  data["annotations"][0]["category_id"] = 42
  with pytest.raises(ValueError, match="annotation 10 refers to unknown category id 42"):
    _build_bad(tmp_path / "b", data)


def test_missing_and_corrupt_images(coco_dir, tmp_path):
  data = coco_dir[3]
  with pytest.raises(FileNotFoundError, match=r"im2\.jpg \(image id 2\) does not exist"):
    _build_bad(tmp_path / "a", data, lambda d: os.remove(d / "im2.jpg"))
  corrupt = lambda d: (d / "im3.png").write_bytes((d / "im3.png").read_bytes()[:60])
  with pytest.raises(ValueError, match=r"im3\.png \(image id 3\) is corrupt"):
    _build_bad(tmp_path / "b", data, corrupt)
  b = _build_bad(
    tmp_path / "c", data, lambda d: (os.remove(d / "im2.jpg"), corrupt(d)), skip_bad_images=True
  )
  drops = b.info.metadata["dropped"]["train"]
  assert drops["missing_image"] == 1 and drops["corrupt_image"] == 1
  assert drops["annotations_of_dropped_images"] == 3
  assert pipeline.records_meta(b, "train")["image_id"].tolist() == [1, 4, 5]


def test_bad_json(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    coco.parse_annotations(tmp_path / "nope.json")
  (tmp_path / "x.json").write_text("{not json")
  with pytest.raises(ValueError, match="x.json: not a valid JSON"):
    coco.parse_annotations(tmp_path / "x.json")
  (tmp_path / "y.json").write_text(
    json.dumps(
      {
        "images": [{"id": 1, "file_name": "a", "height": 4, "width": 4}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
          {
            "id": 5,
            "image_id": 1,
            "category_id": 1,
            "bbox": [0, 0, 2, 2],
            "segmentation": {"size": [3, 3], "counts": [9]},
          }
        ],
      }
    )
  )
  with pytest.raises(ValueError, match="annotation 5: RLE size"):
    coco.parse_annotations(tmp_path / "y.json")
