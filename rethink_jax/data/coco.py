"""coco_instances: a tfds builder for COCO-format instances (boxes, masks and keypoints).

tfds' own coco/2017 has no instance masks, hence this builder. It reads a COCO-format annotation
JSON and its image folder per split and writes this project's record format (data/instances.py):
image bytes (8-bit RGB or grayscale JPEG / PNG as they are, anything else converted to an RGB PNG:
`rgb_image_bytes`), image id, file name, size,
and objects with box, contiguous label, original category id, is_crowd, area, annotation id and the
instance mask (polygons and both RLE forms, converted with pycocotools, stored as uncompressed RLE).
Images without annotations are kept (evaluation needs them; the pipeline may drop them for
training). Crowd regions are kept (COCOeval ignores detections on them) and the pipeline drops them
from training targets, as Detectron2 does.

Keypoints: when categories carry COCO's "keypoints" (names) and "skeleton" (a person_keypoints
file), every object stores K keypoints (data/instances.py; K unlabeled ones for objects of
categories without keypoints) and info.metadata gains the keypoint names, flip map (the
"left*" / "right*" name pairs), skeleton and OKS sigmas (COCO's 17 for COCO's person keypoints,
else CocoInstancesConfig.keypoint_oks_sigmas, else COCO's mean sigma for every keypoint). All
keypoint categories must share one keypoint list. The ground truth JSON written keeps every
annotation's "keypoints" and "num_keypoints" (filled in, all unlabeled / the labeled count,
where an annotation lacks them: COCOeval reads both).

Configs:
  2017    COCO 2017 from manual_dir: annotations/instances_{train,val}2017.json,
          {train,val}2017/*.jpg -> splits "train", "validation".
  keypoints_2017  COCO 2017 person keypoints from manual_dir:
          annotations/person_keypoints_{train,val}2017.json and the same images.
  folder  any COCO-format data set in manual_dir: annotations/<split>.json and images in
          <split>/ for every annotations/*.json.
  any other name: give the paths with `build_coco_instances(...)` (one call from Python).
Command line (array_record is this builder's default file format; the pipeline needs it):
  python -m rethink_jax.data.build --data_dir=~/tensorflow_datasets --config=2017 \
      --manual_dir=/data/coco
  python -m rethink_jax.data.build --data_dir=... --config=mine \
      --split=train:/d/train.json:/d/train_images --split=validation:/d/val.json:/d/val_images
  `tfds build rethink_jax/data/coco.py --config=2017 --manual_dir=/data/coco` works too where the
  tfds CLI can start (tfds 4.9.10's CLI imports apache_beam).

Bad input:
  errors (ValueError / FileNotFoundError naming the file, image or annotation id):
    a missing or unreadable annotation file, duplicate image / annotation / category ids,
    an annotation pointing at an unknown image or category, an RLE whose size is not its image's,
    an image file whose size differs from its JSON entry, and (unless skip_bad_images=True)
    a missing or corrupt image file; keypoints of a wrong length (not 3 * K values), with a
    non-finite coordinate or a visibility other than 0, 1, 2; categories with different keypoint
    lists, a skeleton index outside 1..K.
  documented drops (counted per reason, logged, saved in info.metadata["dropped"][split]):
    "zero_area_box": bbox width or height <= 0;
    "box_outside_image": bbox entirely outside its image (after clipping nothing is left);
    "empty_segmentation": no segmentation, no polygon with >= 3 points, or an empty mask;
    "missing_image" / "corrupt_image" (only with skip_bad_images=True): the image and all its
    annotations.
  Labeled keypoints outside their image ([0, width] x [0, height]) are made unlabeled in the
  records ("keypoint_outside_image" counts them, per point); an annotation of a keypoint
  category without "keypoints" gets K unlabeled points ("keypoints_missing").
  Boxes partly outside their image are clipped to it in the records ("box_clipped" counts them);
  the COCO ground truth JSON keeps the original annotation.
"""

import collections
import dataclasses
import io
import json
import os

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import tensorflow_datasets as tfds

from rethink_jax.data import instances
from rethink_jax.data import shapes

_MANUAL = """\
COCO 2017 (config "2017"): put annotations/instances_train2017.json,
annotations/instances_val2017.json, train2017/ and val2017/ (from https://cocodataset.org) in
manual_dir. Config "folder": annotations/<split>.json and image folder <split>/ per split.
"""

_COCO_2017 = {
  "train": ("annotations/instances_train2017.json", "train2017"),
  "validation": ("annotations/instances_val2017.json", "val2017"),
}
_COCO_2017_KEYPOINTS = {
  "train": ("annotations/person_keypoints_train2017.json", "train2017"),
  "validation": ("annotations/person_keypoints_val2017.json", "val2017"),
}


@dataclasses.dataclass(eq=False)
class CocoInstancesConfig(tfds.core.BuilderConfig):
  """split_paths: {split: (annotation_file, image_dir)}; relative paths are under manual_dir.

  None: the config's manual_dir layout ("2017" or "folder"). skip_bad_images: drop (count, log)
  missing/corrupt image files instead of failing. verify_images: fully decode every image once
  at build time (catches truncated files). annotation_splits: splits whose COCO ground truth
  JSON is written (None = every split except "train"). keypoint_oks_sigmas: the K OKS sigmas of
  a keypoint data set whose keypoints are not COCO's person keypoints (module docstring).
  """

  split_paths: dict | None = None
  skip_bad_images: bool = False
  verify_images: bool = True
  annotation_splits: tuple | None = None
  keypoint_oks_sigmas: tuple | None = None


def config_for_name(name: str) -> "str | CocoInstancesConfig":
  """The registered config of that name, or a path-less config to read a prepared data set."""
  if name in CocoInstances.builder_configs:
    return name
  return CocoInstancesConfig(name=name)


class CocoInstances(shapes.ArrayRecordBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """COCO-format instance segmentation with masks (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL
  BUILDER_CONFIGS = [
    CocoInstancesConfig(name="2017", description="COCO 2017 train / val from manual_dir."),
    CocoInstancesConfig(name="folder", description="annotations/<split>.json + <split>/."),
    CocoInstancesConfig(
      name="keypoints_2017", description="COCO 2017 person keypoints from manual_dir."
    ),
  ]
  DEFAULT_CONFIG_NAME = "2017"

  def _info(self):
    return self.dataset_info_from_configs(
      features=instances.instance_features(),
      metadata=tfds.core.MetadataDict(),
      homepage="https://cocodataset.org",
      disable_shuffling=True,  # record i = generated example i (side files index by record)
    )

  # --- paths -----------------------------------------------------------------------------------
  def _split_paths(self, dl_manager):
    cfg = self.builder_config
    if cfg.split_paths:
      paths = dict(cfg.split_paths)
      root = None
      if any(not os.path.isabs(os.fspath(p)) for pair in paths.values() for p in pair):
        root = dl_manager.manual_dir
    else:
      root = dl_manager.manual_dir
      if cfg.name == "folder":
        ann_dir = epath.Path(root) / "annotations"
        if not ann_dir.exists():
          raise FileNotFoundError(f"{ann_dir} does not exist ({_MANUAL})")
        paths = {p.stem: (f"annotations/{p.name}", p.stem) for p in sorted(ann_dir.glob("*.json"))}
      else:
        paths = dict(_COCO_2017_KEYPOINTS if cfg.name == "keypoints_2017" else _COCO_2017)
    out = {}
    for split, (ann, img) in paths.items():
      ann, img = epath.Path(ann), epath.Path(img)
      out[split] = (
        ann if ann.is_absolute() else epath.Path(root) / ann,
        img if img.is_absolute() else epath.Path(root) / img,
      )
    if not out:
      raise ValueError(f"coco_instances/{cfg.name}: no splits to build")
    return out

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    parsed = {
      split: parse_annotations(ann, split)
      for split, (ann, _) in self._split_paths(dl_manager).items()
    }
    paths = self._split_paths(dl_manager)
    # One label space for all splits: contiguous labels in increasing category id.
    first = next(iter(parsed))
    categories = parsed[first]["categories"]
    keypoints = parsed[first]["keypoints"]
    for split, p in parsed.items():
      if p["categories"] != categories or p["keypoints"] != keypoints:
        raise ValueError(
          f"{paths[split][0]}: categories differ from those of split {first!r} ({paths[first][0]})"
        )
    self.info.metadata["categories"] = categories
    self.info.metadata["dropped"] = {}
    if keypoints:
      self.info.metadata.update(
        instances.keypoint_metadata(
          keypoints["names"], keypoints["skeleton"], self._oks_sigmas(keypoints["names"])
        )
      )
    annotation_splits = (
      cfg.annotation_splits
      if cfg.annotation_splits is not None
      else tuple(s for s in parsed if s != "train")
    )
    return {
      split: self._generate_examples(
        split, paths[split][1], p, categories, split in annotation_splits
      )
      for split, p in parsed.items()
    }

  def _oks_sigmas(self, names):
    """OKS sigmas of the keypoints `names` (module docstring's rule)."""
    given = self.builder_config.keypoint_oks_sigmas
    if given:
      return [float(v) for v in given]
    if tuple(names) == instances.COCO_PERSON_KEYPOINT_NAMES:
      return list(instances.COCO_PERSON_OKS_SIGMAS)
    mean = float(np.mean(instances.COCO_PERSON_OKS_SIGMAS))
    logging.warning(
      "coco_instances: keypoints %s are not COCO's person keypoints and no keypoint_oks_sigmas "
      "were given: OKS sigma %.4f (COCO's mean) for every keypoint",
      names,
      mean,
    )
    return [mean] * len(names)

  # --- examples --------------------------------------------------------------------------------
  def _generate_examples(self, split, image_dir, parsed, categories, write_annotations):
    cfg = self.builder_config
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    dropped = collections.Counter(parsed["dropped"])
    num_kp = len(parsed["keypoints"]["names"]) if parsed["keypoints"] else 0
    kept_images, kept_anns, image_ids, num_objects, num_labeled = [], [], [], [], []
    for key, img in enumerate(parsed["images"]):
      path = epath.Path(image_dir) / img["file_name"]
      data = _read_image(path, img, cfg.verify_images, cfg.skip_bad_images, dropped)
      if data is None:
        dropped["annotations_of_dropped_images"] += len(parsed["anns"].get(img["id"], []))
        continue
      h, w = img["height"], img["width"]
      objects, counts, keypoints = [], [], []
      for ann, xyxy in parsed["anns"].get(img["id"], []):
        mask = _annotation_mask(ann, h, w, parsed["file"])
        if mask is None or not mask.any():
          dropped["empty_segmentation"] += 1
          continue
        counts.append(instances.mask_to_counts(mask))
        objects.append(
          {
            "id": int(ann["id"]),
            "bbox": instances.normalized_bbox(xyxy, h, w),
            "label": label_of[ann["category_id"]],
            "category_id": int(ann["category_id"]),
            "is_crowd": bool(ann.get("iscrowd", 0)),
            "area": float(ann["area"]) if "area" in ann else float(mask.sum()),
            "mask_runs": len(counts[-1]),
          }
        )
        if num_kp:
          kp, outside = parsed["object_keypoints"][ann["id"]]
          keypoints.append(kp)
          dropped["keypoint_outside_image"] += outside
          if ann["category_id"] in parsed["keypoints"]["category_ids"] and not isinstance(
            ann.get("keypoints"), list
          ):
            dropped["keypoints_missing"] += 1
          ann = _with_num_keypoints(ann, num_kp)
        kept_anns.append(ann)
      kept_images.append({k: img[k] for k in ("id", "file_name", "height", "width")})
      image_ids.append(img["id"])
      num_objects.append(sum(not o["is_crowd"] for o in objects))
      kp_flat = np.concatenate(keypoints).reshape(-1) if keypoints else np.zeros((0,), np.float32)
      num_labeled.append(int((kp_flat[2::3] > 0).sum()))
      yield (
        key,
        {
          "image": data,
          "image_id": img["id"],
          "file_name": img["file_name"],
          "height": h,
          "width": w,
          "objects": objects,
          "mask_counts": instances.concat_counts(counts),
          "keypoints": kp_flat.astype(np.float32),
        },
      )
    if not kept_images:
      raise ValueError(f"split {split!r} ({parsed['file']}): no usable image")
    drops = {k: int(v) for k, v in sorted(dropped.items()) if v}
    self.info.metadata["dropped"][split] = drops
    if drops:
      logging.warning(
        "coco_instances %s: dropped/changed %s (see rethink_jax/data/coco.py)", split, drops
      )
    instances.write_split_files(
      self.data_path,
      split,
      images=kept_images,
      annotations=kept_anns,
      categories=parsed["json_categories"],
      image_ids=image_ids,
      num_objects=num_objects,
      num_keypoints=num_labeled if num_kp else None,
      write_annotations=write_annotations,
    )


def _with_num_keypoints(ann, num_keypoints):
  """The annotation for the ground truth JSON: with "keypoints" (K unlabeled points where it has
  none) and "num_keypoints" (its labeled count where it has none), as COCOeval needs."""
  if isinstance(ann.get("keypoints"), list) and "num_keypoints" in ann:
    return ann
  ann = dict(ann)
  if not isinstance(ann.get("keypoints"), list):
    ann["keypoints"] = [0] * (3 * num_keypoints)
  ann["num_keypoints"] = int(sum(v > 0 for v in ann["keypoints"][2::3]))
  return ann


# ---------------------------------------------------------------------------------------------
# Parsing and validation.
# ---------------------------------------------------------------------------------------------
def parse_annotations(ann_file: str | os.PathLike, split: str = "?") -> dict:
  """Reads and validates a COCO-format annotation file (no image is opened).

  Returns:
    {"file", "images" (sorted by id), "anns" {image_id: [(ann, clipped xyxy)]},
     "categories" [{"id", "name"}] sorted by id, "dropped" Counter,
     "keypoints" None or {"names", "skeleton", "category_ids"} (categories with keypoints),
     "object_keypoints" {annotation id: (checked (K, 3) float32 keypoints, labeled points
     outside the image)} (keypoint data sets), "json_categories" (the categories with their
     "keypoints" / "skeleton" for the ground truth JSON)}.
  """
  ann_file = epath.Path(ann_file)
  if not ann_file.exists():
    raise FileNotFoundError(f"split {split!r}: annotation file {ann_file} does not exist")
  try:
    data = json.loads(ann_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{ann_file}: not a valid JSON file ({e})") from e
  for key in ("images", "categories"):
    if key not in data:
      raise ValueError(f"{ann_file}: no {key!r} list (not a COCO instances file?)")
  images = {}
  for img in data["images"]:
    for k in ("id", "file_name", "height", "width"):
      if k not in img:
        raise ValueError(f"{ann_file}: image entry {img.get('id', img)} has no {k!r}")
    if img["id"] in images:
      raise ValueError(f"{ann_file}: duplicate image id {img['id']}")
    images[img["id"]] = img
  categories, json_categories = {}, {}
  for c in data["categories"]:
    if c["id"] in categories:
      raise ValueError(f"{ann_file}: duplicate category id {c['id']}")
    categories[c["id"]] = {"id": int(c["id"]), "name": str(c.get("name", c["id"]))}
    json_categories[c["id"]] = dict(categories[c["id"]])
    for key in ("supercategory", "keypoints", "skeleton"):
      if key in c:
        json_categories[c["id"]][key] = c[key]
  keypoints = _keypoint_categories(data["categories"], ann_file)
  num_kp = len(keypoints["names"]) if keypoints else 0
  object_keypoints = {}
  anns = collections.defaultdict(list)
  dropped = collections.Counter()
  seen = set()
  for ann in data.get("annotations", []):
    aid = ann.get("id")
    if aid is None:
      raise ValueError(f"{ann_file}: annotation without an id (image {ann.get('image_id')})")
    if aid in seen:
      raise ValueError(f"{ann_file}: duplicate annotation id {aid}")
    seen.add(aid)
    if ann.get("image_id") not in images:
      raise ValueError(
        f"{ann_file}: annotation {aid} refers to unknown image id {ann.get('image_id')}"
      )
    if ann.get("category_id") not in categories:
      raise ValueError(
        f"{ann_file}: annotation {aid} refers to unknown category id {ann.get('category_id')}"
      )
    img = images[ann["image_id"]]
    if "bbox" not in ann or len(ann["bbox"]) != 4:
      raise ValueError(f"{ann_file}: annotation {aid} has no [x, y, w, h] bbox")
    x, y, bw, bh = (float(v) for v in ann["bbox"])
    if not bw > 0 or not bh > 0:
      dropped["zero_area_box"] += 1
      continue
    xyxy = [
      max(x, 0.0),
      max(y, 0.0),
      min(x + bw, float(img["width"])),
      min(y + bh, float(img["height"])),
    ]
    if xyxy[2] <= xyxy[0] or xyxy[3] <= xyxy[1]:
      dropped["box_outside_image"] += 1
      continue
    if xyxy != [x, y, x + bw, y + bh]:
      dropped["box_clipped"] += 1
    seg = ann.get("segmentation")
    if (
      isinstance(seg, dict) and "size" in seg and list(seg["size"]) != [img["height"], img["width"]]
    ):
      raise ValueError(
        f"{ann_file}: annotation {aid}: RLE size {seg['size']} differs from its "
        f"image {img['id']} ({img['height']}, {img['width']})"
      )
    if num_kp:
      values = ann.get("keypoints")
      if values is None:
        values = [0] * (3 * num_kp)
      try:
        object_keypoints[aid] = instances.check_keypoints(
          values, num_kp, img["height"], img["width"]
        )
      except ValueError as e:
        raise ValueError(f"{ann_file}: annotation {aid}: {e}") from e
    anns[ann["image_id"]].append((ann, xyxy))
  return {
    "file": str(ann_file),
    "images": [images[k] for k in sorted(images)],
    "anns": anns,
    "categories": [categories[k] for k in sorted(categories)],
    "dropped": dropped,
    "keypoints": keypoints,
    "object_keypoints": object_keypoints,
    "json_categories": [json_categories[k] for k in sorted(json_categories)],
  }


def _keypoint_categories(categories, ann_file):
  """{"names", "skeleton", "category_ids"} of the categories that list keypoints, or None.

  Every keypoint category must list the same keypoints (one K per data set).
  """
  with_kp = [c for c in categories if c.get("keypoints")]
  if not with_kp:
    return None
  listed = lambda c: ([str(n) for n in c["keypoints"]], [list(p) for p in c.get("skeleton") or []])
  names, skeleton = listed(with_kp[0])
  for c in with_kp[1:]:
    if listed(c) != (names, skeleton):
      raise ValueError(
        f"{ann_file}: categories {with_kp[0]['id']} and {c['id']} list different keypoints or "
        "skeletons (one keypoint list per data set)"
      )
  try:
    instances.keypoint_metadata(names, skeleton, [1.0] * len(names))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{ann_file}: category {with_kp[0]['id']}: {e}") from e
  return {
    "names": names,
    "skeleton": [[int(i), int(j)] for i, j in skeleton],
    "category_ids": sorted(int(c["id"]) for c in with_kp),
  }


def _annotation_mask(ann, h, w, ann_file):
  """(h, w) uint8 mask of an annotation (polygons, uncompressed or compressed RLE), or None."""
  seg = ann.get("segmentation")
  if not seg:
    return None
  try:
    if isinstance(seg, list):
      polys = [p for p in seg if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]
      if not polys:
        return None
      rle = mask_utils.merge(mask_utils.frPyObjects([list(map(float, p)) for p in polys], h, w))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
      rle = mask_utils.frPyObjects(seg, h, w)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
      rle = dict(seg)
      if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    else:
      raise ValueError("unknown segmentation format")
    return mask_utils.decode(rle)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{ann_file}: annotation {ann['id']}: bad segmentation ({e})") from e


def _png_bit_depth(data: bytes) -> int:
  """The bit depth in a PNG's IHDR chunk (byte 24 of the file)."""
  return data[24] if len(data) > 24 and data[:8] == b"\x89PNG\r\n\x1a\n" else 8


def rgb_image_bytes(im: Image.Image, data: bytes) -> bytes:
  """`data` (the file of `im`) when it is an 8-bit RGB or grayscale JPEG / PNG, else the image
  as an 8-bit RGB PNG.

  The records declare (H, W, 3) uint8 images. tf.data's decoder converts anything to that, but
  tfds' NumPy reader (builder.as_data_source, grain) decodes the bytes with PIL as they are:
  RGBA / CMYK -> 4 channels, palette -> indices, 16-bit -> wrapped values. Converting here makes
  both readers return the same pixels. Alpha is dropped (as tf.data does); 16-bit values map to
  8 bits as round(v / 257); CMYK and palette go through PIL's RGB conversion.
  """
  kept = im.format in ("JPEG", "PNG") and im.mode in ("RGB", "L")
  if kept and not (im.format == "PNG" and _png_bit_depth(data) > 8):
    return data
  if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit) grayscale
    arr = np.asarray(im, np.float64)
    scale = 257.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 1.0
    gray = np.clip(np.round(arr / scale), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(gray, "L").convert("RGB")
  else:
    rgb = im.convert("RGB")
  buf = io.BytesIO()
  rgb.save(buf, format="PNG")
  return buf.getvalue()


def _read_image(path, img, verify, skip_bad, dropped):
  """Encoded bytes of an image file (rgb_image_bytes); None if skipped."""
  if not path.exists():
    if skip_bad:
      dropped["missing_image"] += 1
      logging.warning("missing image file %s (image id %s): dropped", path, img["id"])
      return None
    raise FileNotFoundError(f"image file {path} (image id {img['id']}) does not exist")
  data = path.read_bytes()
  try:
    with Image.open(io.BytesIO(data)) as im:
      size = im.size
      if verify:
        im.load()
      data = rgb_image_bytes(im, data)
  except Exception as e:  # pylint: disable=broad-except
    if skip_bad:
      dropped["corrupt_image"] += 1
      logging.warning("corrupt image file %s (image id %s): dropped (%s)", path, img["id"], e)
      return None
    raise ValueError(f"image file {path} (image id {img['id']}) is corrupt: {e}") from e
  if size != (img["width"], img["height"]):
    raise ValueError(
      f"image file {path} (image id {img['id']}) is {size[0]}x{size[1]} but the "
      f"annotation file says {img['width']}x{img['height']}"
    )
  return data


def build_coco_instances(
  data_dir,
  splits,
  *,
  name="custom",
  skip_bad_images=False,
  verify_images=True,
  annotation_splits=None,
  keypoint_oks_sigmas=None,
  file_format="array_record",
):
  """Builds coco_instances/<name> from paths in one call.

  Args:
    data_dir: tfds data dir to write to.
    splits: {split: (annotation_file, image_dir)}, e.g. {"train": (...), "validation": (...)}.
    name: config name (data.builder_config of the pipeline).
    skip_bad_images, verify_images, annotation_splits, keypoint_oks_sigmas: see
      CocoInstancesConfig.
    file_format: "array_record" (what the pipeline reads).
  Returns:
    the prepared builder.
  """
  cfg = CocoInstancesConfig(
    name=name,
    split_paths={k: (os.fspath(a), os.fspath(i)) for k, (a, i) in splits.items()},
    skip_bad_images=skip_bad_images,
    verify_images=verify_images,
    annotation_splits=None if annotation_splits is None else tuple(annotation_splits),
    keypoint_oks_sigmas=None if keypoint_oks_sigmas is None else tuple(keypoint_oks_sigmas),
  )
  builder = CocoInstances(config=cfg, data_dir=os.fspath(data_dir), file_format=file_format)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
