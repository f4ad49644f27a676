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
  keypoints    (N * K * 3,) float32: every object's K keypoints [x1, y1, v1, x2, ...] in COCO's
               convention (original image pixels as in the JSON; v: 0 unlabeled, 1 labeled but
               not visible, 2 visible; unlabeled points are 0, 0, 0), concatenated in object
               order; K is the data set's (info.metadata["keypoint_names"]), and objects of a
               category without keypoints have K unlabeled points. Empty for data sets without
               keypoints (K = 0) and in records built before this field existed (it reads as
               empty).

Records are written in generation order (`disable_shuffling`), so record i of a split is the i-th
generated example and the side files below can be indexed by record number:
  <data_path>/records/<split>.json      {"image_id": [...], "num_objects": [...], "height": [...],
                                        "width": [...]} per record, where num_objects counts the
                                        non-crowd instances (used to drop empty training images
                                        without decoding any record) and height, width are the
                                        original size (orientation buckets; older builds lack
                                        them). Data sets with keypoints add "num_keypoints":
                                        the labeled (v > 0) keypoints of the record's objects,
                                        crowd ones included (Detectron2's count for its
                                        MIN_KEYPOINTS_PER_IMAGE filter).
  <data_path>/annotations/<split>.json  COCO-format ground truth of exactly the stored records
                                        (what evaluation scores against).
The builder's `info.metadata["categories"]` lists {"id", "name"} in contiguous-label order. Data
sets with keypoints (K > 0) add to info.metadata (see `keypoint_metadata`):
  "keypoint_names"       K names; "keypoint_flip_map": [left_name, right_name] pairs swapped by a
                         horizontal flip; "skeleton": COCO's 1-based [i, j] pairs of the drawing;
  "keypoint_oks_sigmas"  K floats, COCOeval's per-keypoint OKS sigmas.
and their COCO ground truth keeps "keypoints" and "num_keypoints" on every annotation (COCOeval's
iouType "keypoints" reads both), the keypoint categories "keypoints" and "skeleton".
"""

from collections.abc import Sequence
import os

import numpy as np
from pycocotools import mask as mask_utils
import tensorflow_datasets as tfds

from rethink_jax import files

RECORDS_DIR = "records"
ANNOTATIONS_DIR = "annotations"

# COCO's person keypoints in the order of its person_keypoints JSON.
COCO_PERSON_KEYPOINT_NAMES = (
  "nose",
  "left_eye",
  "right_eye",
  "left_ear",
  "right_ear",
  "left_shoulder",
  "right_shoulder",
  "left_elbow",
  "right_elbow",
  "left_wrist",
  "right_wrist",
  "left_hip",
  "right_hip",
  "left_knee",
  "right_knee",
  "left_ankle",
  "right_ankle",
)
# COCOeval's default kpt_oks_sigmas (pycocotools' Params.setKpParams), in the order above.
COCO_PERSON_OKS_SIGMAS = tuple(
  v / 10.0
  for v in (0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72)
  + (0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89)
)


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
      "keypoints": tfds.features.Tensor(shape=(None,), dtype=np.float32),
    }
  )


def flip_map_from_names(names: Sequence[str]) -> list[list[str]]:
  """[left, right] name pairs that a horizontal flip swaps: "left<rest>" with "right<rest>".

  For COCO's person keypoints this is Detectron2's COCO_PERSON_KEYPOINT_FLIP_MAP.
  """
  names = list(names)
  return [[n, "right" + n[4:]] for n in names if n.startswith("left") and "right" + n[4:] in names]


def flip_indices(names: Sequence[str], flip_map: Sequence[Sequence[str]]) -> np.ndarray:
  """(K,) int32: after a horizontal flip, keypoint k is the flipped image's keypoint
  flip_indices[k] (Detectron2's create_keypoint_hflip_indices): keypoints[flip_indices] swaps the
  pairs of flip_map and keeps every other keypoint."""
  names = list(names)
  partner = {}
  for left, right in flip_map:
    partner[left], partner[right] = right, left
  return np.asarray([names.index(partner.get(n, n)) for n in names], np.int32)


def keypoint_metadata(
  names: Sequence[str],
  skeleton: Sequence[Sequence[int]],
  oks_sigmas: Sequence[float],
  flip_map: Sequence[Sequence[str]] | None = None,
) -> dict:
  """The builder's info.metadata keypoint fields (module docstring), checked.

  Args:
    names: K keypoint names (distinct). skeleton: 1-based [i, j] pairs. oks_sigmas: K floats > 0.
    flip_map: [left, right] pairs of names; None = flip_map_from_names(names).
  """
  names = [str(n) for n in names]
  k = len(names)
  if k == 0 or len(set(names)) != k:
    raise ValueError(f"keypoint names must be distinct and not empty, got {names}")
  flip_map = flip_map_from_names(names) if flip_map is None else [list(p) for p in flip_map]
  for pair in flip_map:
    if len(pair) != 2 or not set(pair) <= set(names) or pair[0] == pair[1]:
      raise ValueError(f"keypoint flip pair {pair} is not two different names of {names}")
  skeleton = [[int(i), int(j)] for i, j in skeleton]
  if any(not (1 <= i <= k and 1 <= j <= k) for i, j in skeleton):
    raise ValueError(f"skeleton {skeleton} has indices outside 1..{k} (COCO's are 1-based)")
  sigmas = [float(v) for v in oks_sigmas]
  if len(sigmas) != k or not all(v > 0 for v in sigmas):
    raise ValueError(f"need {k} positive OKS sigmas, got {sigmas}")
  return {
    "keypoint_names": names,
    "keypoint_flip_map": flip_map,
    "skeleton": skeleton,
    "keypoint_oks_sigmas": sigmas,
  }


def check_keypoints(
  values: Sequence[float], num_keypoints: int, height: int, width: int
) -> tuple[np.ndarray, int]:
  """One annotation's COCO keypoints, checked, as stored in the records.

  Labeled points (v > 0) outside the image ([0, width] x [0, height]) become unlabeled, and every
  unlabeled point is (0, 0, 0) (COCO's convention).

  Args:
    values: [x1, y1, v1, ...] of the annotation. num_keypoints: K of the data set.
    height, width: the image size.
  Returns:
    (K, 3) float32 keypoints, number of labeled points made unlabeled for lying outside.
  Raises:
    ValueError: not 3 * K numbers, a non-finite coordinate, or a visibility other than 0, 1, 2.
  """
  try:
    kp = np.asarray(values, np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"keypoints are not a list of numbers ({e})") from e
  if kp.ndim != 1 or kp.size != 3 * num_keypoints:
    raise ValueError(
      f"keypoints have {kp.size} values, expected 3 * {num_keypoints} = {3 * num_keypoints}"
    )
  kp = kp.reshape(num_keypoints, 3)
  if not np.isfinite(kp).all():
    raise ValueError("keypoints hold a non-finite value")
  v = kp[:, 2]
  if not np.isin(v, (0, 1, 2)).all():
    raise ValueError(f"keypoint visibilities must be 0, 1 or 2, got {sorted(set(v.tolist()))}")
  x, y = kp[:, 0], kp[:, 1]
  outside = (v > 0) & ((x < 0) | (x > width) | (y < 0) | (y > height))
  kp[(v == 0) | outside] = 0.0
  return kp.astype(np.float32), int(outside.sum())


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
  num_keypoints=None,
  write_annotations=True,
):
  """Writes records/<split>.json and (optionally) annotations/<split>.json under data_path.

  Args:
    data_path: the builder's data directory (during preparation: its temporary directory).
    split: split name.
    images: COCO image dicts (id, file_name, height, width) of the stored records.
    annotations: COCO annotation dicts of the stored records.
    categories: COCO category dicts {"id", "name"} (keypoint categories also "keypoints",
      "skeleton") in contiguous-label order.
    image_ids: (N,) image id of record i.
    num_objects: (N,) number of non-crowd instances of record i.
    num_keypoints: (N,) labeled keypoints of record i (data sets with keypoints), or None.
    write_annotations: whether to write the COCO ground truth file.
  """
  data_path = os.fspath(data_path)
  meta = {"image_id": [int(i) for i in image_ids], "num_objects": [int(n) for n in num_objects]}
  sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in images}
  if all(int(i) in sizes for i in image_ids):  # the pipeline's orientation buckets read them
    meta["height"] = [sizes[int(i)][0] for i in image_ids]
    meta["width"] = [sizes[int(i)][1] for i in image_ids]
  if num_keypoints is not None:
    meta["num_keypoints"] = [int(n) for n in num_keypoints]
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
