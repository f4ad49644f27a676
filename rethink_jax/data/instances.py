"""The on-disk record format shared by the instance builders (shapes_instances, coco_instances).

Every instance data set of this project stores, per image (tfds features):
  image        (H, W, 3) uint8, the encoded file bytes (PNG or JPEG) kept as they are.
  image_id     int64, the COCO image id.
  file_name    text.
  height, width  int32, the original image size.
  objects      Sequence of
    id           int64, the COCO annotation id.
    bbox         tfds BBoxFeature: normalized [ymin, xmin, ymax, xmax] in the original image.
    label        int64, contiguous class index 0..K-1 (the pipeline adds 1: 0 is background).
    category_id  int64, the original COCO category id.
    is_crowd     bool.
    area         float32, the COCO area (of the segmentation).
    mask_runs    int32, the number of RLE runs of this instance's mask in `mask_counts`.
  mask_counts  (sum of mask_runs,) int32: the uncompressed COCO RLEs of all instance masks,
               concatenated in object order (each: column-major run lengths, starting with a run
               of zeros, summing to H * W). Compact (varint-packed in the tf.train.Example) and
               decodable inside the tf.data graph without Python.

Records are written in generation order (`disable_shuffling`), so record i of a split is the i-th
generated example and the side files below can be indexed by record number:
  <data_path>/records/<split>.json      {"image_id": [...], "num_objects": [...], "height": [...],
                                        "width": [...]} per record, where num_objects counts the
                                        non-crowd instances (used to drop empty training images
                                        without decoding any record) and height, width are the
                                        original size (orientation buckets; older builds lack
                                        them).
  <data_path>/annotations/<split>.json  COCO-format ground truth of exactly the stored records
                                        (what evaluation scores against).
The builder's `info.metadata["categories"]` lists {"id", "name"} in contiguous-label order.
"""

from collections.abc import Sequence
import os

import numpy as np
from pycocotools import mask as mask_utils
import tensorflow_datasets as tfds

from rethink_jax import files

RECORDS_DIR = "records"
ANNOTATIONS_DIR = "annotations"


def instance_features() -> tfds.features.FeaturesDict:
  """The tfds FeaturesDict of one instance-segmentation record (see module docstring)."""
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "image_id": np.int64,
      "file_name": tfds.features.Text(),
      "height": np.int32,
      "width": np.int32,
      "objects": tfds.features.Sequence(
        {
          "id": np.int64,
          "bbox": tfds.features.BBoxFeature(),
          "label": np.int64,
          "category_id": np.int64,
          "is_crowd": np.bool_,
          "area": np.float32,
          "mask_runs": np.int32,
        }
      ),
      "mask_counts": tfds.features.Tensor(shape=(None,), dtype=np.int32),
    }
  )


def mask_to_counts(mask: np.ndarray) -> np.ndarray:
  """Uncompressed COCO RLE of one binary mask.

  Args:
    mask: (H, W) bool/uint8.
  Returns:
    (R,) int32 run lengths in column-major order, starting with a (possibly empty) run of zeros.
  """
  if mask.ndim != 2:
    raise ValueError(f"mask_to_counts expects an (H, W) mask, got shape {mask.shape}")
  flat = np.asarray(mask, dtype=bool).ravel(order="F")
  # Positions where the value changes, with a virtual 0 before the start.
  changes = np.flatnonzero(np.diff(np.concatenate([[False], flat, [not flat[-1]]]).astype(np.int8)))
  counts = np.diff(np.concatenate([[0], changes]))
  return counts.astype(np.int32)


def concat_counts(counts_list: Sequence[np.ndarray]) -> np.ndarray:
  """Concatenates per-instance (R_i,) counts into the record's flat (sum R_i,) int32 array."""
  if not counts_list:
    return np.zeros((0,), np.int32)
  return np.concatenate(counts_list).astype(np.int32)


def counts_to_mask(counts: np.ndarray, height: int, width: int) -> np.ndarray:
  """Inverse of `mask_to_counts`: (R,) run lengths -> (H, W) uint8 mask."""
  counts = np.asarray(counts, dtype=np.int64)
  if counts.sum() != height * width:
    raise ValueError(f"RLE counts sum to {counts.sum()}, expected {height} * {width}")
  values = (np.arange(len(counts)) % 2).astype(np.uint8)
  return np.repeat(values, counts).reshape(width, height).T


def coco_rle(mask: np.ndarray) -> dict:
  """(H, W) binary mask -> JSON-serializable compressed COCO RLE {"size", "counts": str}."""
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle


def normalized_bbox(xyxy: Sequence[float], height: int, width: int) -> tfds.features.BBox:
  """xyxy in pixels -> tfds BBox (normalized ymin, xmin, ymax, xmax), clipped to [0, 1]."""
  x1, y1, x2, y2 = [float(v) for v in xyxy]
  vals = np.clip([y1 / height, x1 / width, y2 / height, x2 / width], 0.0, 1.0)
  return tfds.features.BBox(*[float(v) for v in vals])


def write_split_files(
  data_path,
  split,
  *,
  images,
  annotations,
  categories,
  image_ids,
  num_objects,
  write_annotations=True,
):
  """Writes records/<split>.json and (optionally) annotations/<split>.json under data_path.

  Args:
    data_path: the builder's data directory (during preparation: its temporary directory).
    split: split name.
    images: COCO image dicts (id, file_name, height, width) of the stored records.
    annotations: COCO annotation dicts of the stored records.
    categories: COCO category dicts {"id", "name"} in contiguous-label order.
    image_ids: (N,) image id of record i.
    num_objects: (N,) number of non-crowd instances of record i.
    write_annotations: whether to write the COCO ground truth file.
  """
  data_path = os.fspath(data_path)
  meta = {"image_id": [int(i) for i in image_ids], "num_objects": [int(n) for n in num_objects]}
  sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in images}
  if all(int(i) in sizes for i in image_ids):  # the pipeline's orientation buckets read them
    meta["height"] = [sizes[int(i)][0] for i in image_ids]
    meta["width"] = [sizes[int(i)][1] for i in image_ids]
  files.write_json(os.path.join(data_path, RECORDS_DIR, f"{split}.json"), meta)
  if write_annotations:
    files.write_json(
      os.path.join(data_path, ANNOTATIONS_DIR, f"{split}.json"),
      {
        "images": images,
        "annotations": annotations,
        "categories": categories,
        "info": {"description": f"ground truth of split {split!r}"},
        "licenses": [],
      },
    )
