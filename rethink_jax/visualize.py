"""Pictures of what a detector finds: ground truth and detections drawn on images.

`draw` is the one drawing function: rethink_jax.predict's per-image PNGs, the trainer's
TensorBoard images and rethink_jax.compare's predictions.png all use it. It draws a "drawable",
the objects of one image:
  boxes (N, 4) float xyxy in the image's pixels, labels (N,) int, masks (N, H, W) bool,
  scores (N,) float (absent for ground truth), names (N,) str (optional; else the label),
  keypoints (N, P, 3) float [x, y, v] (optional): x, y continuous image coordinates (pixel
    centres at +0.5), v the COCO visibility (ground truth: 0 unlabeled, 1 labeled but not
    visible, 2 visible) or the keypoint's score (detections); a keypoint is drawn when
    v > KEYPOINT_THRESH (Detectron2's visualizer's rule), filled, or hollow for v == 1 of
    ground truth,
  skeleton (E, 2) int (optional): 0-based keypoint pairs joined by a line when both are drawn.

The trainer's evaluation records, in WORKDIR/eval_images/ (RECORD_DIR):
  sample.json          the images chosen once per run (the first config.eval.record_images
                       images of the evaluation split holding an object; the same for every run on
                       that split): ids, sizes, COCO ground truth (RLE masks, keypoints),
                       category names, the keypoint skeleton (data sets with keypoints);
  IMAGE_ID.png         those images, so pictures need neither the data set nor a checkpoint;
  step_XXXXXXXX.json   at every evaluation, {"step", "detections"}: the COCO results of those
                       images (the MAX_RECORDED highest scores of each).
It also writes GT | detections of the first config.eval.tensorboard_images of them to TensorBoard.
rethink_jax.compare turns the arms' records into predictions.png (write_predictions_png): a row
per image, columns ground truth | each arm at 1x | each arm at its longest multiple.
"""

from collections.abc import Sequence
import colorsys
import os
import re
from typing import Any

import numpy as np

from rethink_jax import files

RECORD_DIR = "eval_images"
SAMPLE_FILE = "sample.json"
SCORE_THRESH = 0.5  # detections drawn in the pictures: score >= this
MAX_RECORDED = 20  # detections kept per image and evaluation (the highest scores)
CELL = 256  # pixels of a picture's longer side in predictions.png and TensorBoard
MAX_PNG_BYTES = 1_500_000  # a larger predictions.png is written again with a 256-colour palette
KEYPOINT_THRESH = 0.05  # keypoints drawn: visibility or score > this
KEYPOINT_RADIUS = 2.5  # pixels of a drawn keypoint
_ARM_LABELS = {"finetune": "fine-tuned", "scratch": "scratch"}
_STEP_FILE = re.compile(r"^step_(\d+)\.json$")


# ------------------------------------------------------------------------------------------------
# Drawing one image.
# ------------------------------------------------------------------------------------------------
def color(i: int) -> np.ndarray:
  """(3,) float RGB 0..255: a distinct bright colour per object (golden-ratio hues)."""
  r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0)
  return np.array([r, g, b]) * 255


def _shown(result: dict, score_thresh: float) -> np.ndarray:
  """Indices of the objects drawn: all of ground truth, detections scoring >= score_thresh."""
  if result.get("scores") is None:
    return np.arange(len(result["boxes"]))
  return np.flatnonzero(np.asarray(result["scores"]) >= score_thresh)


def label_texts(result: dict, score_thresh: float = 0.0) -> list[str]:
  """The texts `draw` writes above the boxes, "name score" ("name" for ground truth)."""
  names, scores = result.get("names"), result.get("scores")
  out = []
  for i in _shown(result, score_thresh):
    name = names[i] if names is not None else str(int(result["labels"][i]))
    out.append(name if scores is None else f"{name} {float(scores[i]):.2f}")
  return out


def draw(image: np.ndarray, result: dict, score_thresh: float = 0.0) -> Any:
  """A PIL image: masks blended in, boxes drawn, "name score" written above each box.

  Args:
    image: (H, W, 3) uint8 RGB.
    result: a drawable of that image (module doc).
    score_thresh: detections scoring below it are not drawn (ground truth is always drawn).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top

  canvas = np.asarray(image).astype(np.float32)
  shown = _shown(result, score_thresh)
  texts = label_texts(result, score_thresh)
  # Lowest score first so the best detections end on top.
  for i in reversed(shown):
    m = np.asarray(result["masks"][i], bool)
    canvas[m] = 0.5 * canvas[m] + 0.5 * color(i)
  pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
  pen = ImageDraw.Draw(pil)
  for i, text in reversed(list(zip(shown, texts))):
    rgb = tuple(int(v) for v in color(i))
    x0, y0, x1, y1 = (float(v) for v in result["boxes"][i])
    pen.rectangle([x0, y0, x1, y1], outline=rgb, width=2)
    if result.get("keypoints") is not None:
      _draw_keypoints(pen, result, i, rgb)
    tx, ty = x0, max(0.0, y0 - 12)
    left, top, right, bottom = pen.textbbox((tx, ty), text)
    pen.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=rgb)
    pen.text((tx, ty), text, fill=(0, 0, 0))
  return pil


def _draw_keypoints(pen: Any, result: dict, i: int, rgb: tuple[int, int, int]) -> None:
  """Object i's skeleton lines and keypoints (module doc) drawn with PIL's ImageDraw `pen`."""
  points = np.asarray(result["keypoints"][i], np.float64).reshape(-1, 3)
  on = points[:, 2] > KEYPOINT_THRESH
  for a, b in np.asarray(result.get("skeleton", np.zeros((0, 2))), np.int64).reshape(-1, 2):
    if max(a, b) < len(points) and on[a] and on[b]:
      pen.line([tuple(points[a, :2]), tuple(points[b, :2])], fill=rgb, width=2)
  hollow = result.get("scores") is None  # ground truth: v == 1 (labeled, not visible) hollow
  r = KEYPOINT_RADIUS
  for x, y, v in points[on]:
    fill = None if hollow and v < 1.5 else rgb
    pen.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(0, 0, 0), width=1)


def _nearest(n_in: int, n_out: int) -> np.ndarray:
  """Source index of each of n_out samples of n_in (nearest neighbour, pixel centres)."""
  return np.minimum((np.arange(n_out) + 0.5) * n_in / n_out, n_in - 1).astype(np.int64)


def fit(image: np.ndarray, result: dict, side: int = CELL) -> tuple[np.ndarray, dict]:
  """(image, drawable) scaled so that the longer side is `side` (boxes, masks, keypoints).

  Small images grow by an integer factor by pixel repetition (labels fit, the PNG stays small);
  large ones shrink bilinearly.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  h, w = image.shape[:2]
  factor = side // max(h, w)
  if factor >= 1:
    nh, nw = h * factor, w * factor
    out = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
  else:
    scale = side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  sx, sy = nw / w, nh / h
  res = dict(result)
  res["boxes"] = np.asarray(result["boxes"], np.float32).reshape(-1, 4) * np.float32(
    [sx, sy, sx, sy]
  )
  masks = np.asarray(result["masks"], bool).reshape(-1, h, w)
  res["masks"] = masks[:, _nearest(h, nh)][:, :, _nearest(w, nw)]
  if result.get("keypoints") is not None:
    points = np.array(result["keypoints"], np.float32).reshape(len(masks), -1, 3)
    points[..., :2] *= np.float32([sx, sy])
    res["keypoints"] = points
  return out, res


# ------------------------------------------------------------------------------------------------
# COCO objects <-> drawables.
# ------------------------------------------------------------------------------------------------
def from_coco(
  objects: Sequence[dict],
  hw: Sequence[int],
  names: dict[int, str] | None = None,
  skeleton: Sequence[Sequence[int]] | None = None,
) -> dict:
  """COCO annotations or results of one image -> a drawable, in the given order.

  Args:
    objects: dicts with "bbox" [x, y, w, h], "category_id", "segmentation" (RLE, counts str or
      bytes; absent: an all-False mask), optionally "score" and "keypoints" (COCO's flat
      [x, y, v, ...], integer pixel indices: drawn at the pixel centre, +0.5).
    hw: (H, W) of the image.
    names: {category_id: name}; the category id is written when absent.
    skeleton: COCO's keypoint skeleton (1-based pairs), drawn when objects have keypoints.
  """
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top

  h, w = int(hw[0]), int(hw[1])
  boxes = np.zeros((len(objects), 4), np.float32)
  masks = np.zeros((len(objects), h, w), bool)
  for i, o in enumerate(objects):
    x, y, bw, bh = (float(v) for v in o["bbox"])
    boxes[i] = (x, y, x + bw, y + bh)
    if o.get("segmentation") is not None:
      masks[i] = mask_utils.decode(dict(o["segmentation"])).astype(bool)
  labels = np.array([int(o["category_id"]) for o in objects], np.int64)
  out = {
    "boxes": boxes,
    "labels": labels,
    "masks": masks,
    "names": [(names or {}).get(int(k), str(int(k))) for k in labels],
  }
  if objects and all("score" in o for o in objects):
    out["scores"] = np.array([float(o["score"]) for o in objects], np.float32)
  elif not objects:
    out["scores"] = np.zeros((0,), np.float32)  # an empty result is a detection result
  num_points = max((len(o.get("keypoints") or ()) // 3 for o in objects), default=0)
  if num_points:
    points = np.zeros((len(objects), num_points, 3), np.float32)
    for i, o in enumerate(objects):
      if o.get("keypoints"):
        points[i] = np.asarray(o["keypoints"], np.float32).reshape(num_points, 3)
    points[..., :2] += 0.5
    out["keypoints"] = points
    out["skeleton"] = np.asarray(skeleton if skeleton else [], np.int64).reshape(-1, 2) - 1
  return out


def _rle_json(rle: dict) -> dict:
  counts = rle["counts"]
  counts = counts.decode("ascii") if isinstance(counts, bytes) else str(counts)
  return {"size": [int(v) for v in rle["size"]], "counts": counts}


# ------------------------------------------------------------------------------------------------
# The trainer's records.
# ------------------------------------------------------------------------------------------------
def choose_sample(data_config: Any, coco_gt: Any, num: int) -> tuple[dict, dict[int, np.ndarray]]:
  """The first `num` images of data_config.eval_split that hold a non-crowd object.

  Args:
    data_config: config.data as evaluated (rethink_jax.train.eval_data_config).
    coco_gt: pycocotools COCO of that split (pipeline.get_coco_gt).
    num: how many images.
  Returns:
    (sample, images): sample = the sample.json dict {"split", "image_ids", "images" [{id, height,
    width}], "annotations" {str(id): COCO annotations with RLE masks (and keypoints)},
    "categories" [{id, name}], "skeleton" (COCO's 1-based pairs; [] without keypoints)};
    images = {image id: (H, W, 3) uint8}.
  """
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  source = pipeline.get_builder(data_config).as_data_source(split=data_config.eval_split)
  sample = {
    "split": str(data_config.eval_split),
    "image_ids": [],
    "images": [],
    "annotations": {},
    "categories": [{"id": int(c["id"]), "name": c["name"]} for c in coco_gt.dataset["categories"]],
    "skeleton": next(
      (
        [[int(v) for v in e] for e in c["skeleton"]]
        for c in coco_gt.dataset["categories"]
        if c.get("skeleton")
      ),
      [],
    ),
  }
  images = {}
  for i in range(len(source)):
    if len(images) >= num:
      break
    example = source[i]
    image_id = int(example["image_id"])
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id], iscrowd=False))
    if not anns:
      continue
    image = np.asarray(example["image"], np.uint8)
    sample["image_ids"].append(image_id)
    sample["images"].append({"id": image_id, "height": image.shape[0], "width": image.shape[1]})
    sample["annotations"][str(image_id)] = [
      {
        "bbox": [float(v) for v in a["bbox"]],
        "category_id": int(a["category_id"]),
        "segmentation": _rle_json(coco_gt.annToRLE(a)),
        **({"keypoints": [float(v) for v in a["keypoints"]]} if a.get("keypoints") else {}),
      }
      for a in anns
    ]
    images[image_id] = image
  return sample, images


def save_sample(record_dir: str, sample: dict, images: dict[int, np.ndarray]) -> None:
  """Writes sample.json and IMAGE_ID.png of choose_sample's output into record_dir."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  os.makedirs(record_dir, exist_ok=True)
  for image_id, image in images.items():
    path = os.path.join(record_dir, f"{image_id}.png")
    Image.fromarray(image).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)
  files.write_json(os.path.join(record_dir, SAMPLE_FILE), sample, indent=1)


def load_sample(record_dir: str) -> tuple[dict, dict[int, np.ndarray]] | None:
  """(sample, images) saved by save_sample, or None when record_dir holds none."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  sample = files.read_json(os.path.join(record_dir, SAMPLE_FILE))
  if sample is None:
    return None
  images = {}
  for image_id in sample["image_ids"]:
    with Image.open(os.path.join(record_dir, f"{image_id}.png")) as im:
      images[int(image_id)] = np.asarray(im.convert("RGB"))
  return sample, images


def ground_truth(sample: dict, image_id: int) -> dict:
  """The drawable of an image's ground truth in a sample."""
  info = next(im for im in sample["images"] if im["id"] == image_id)
  return from_coco(
    sample["annotations"][str(image_id)],
    (info["height"], info["width"]),
    category_names(sample),
    sample.get("skeleton"),
  )


def category_names(sample: dict) -> dict[int, str]:
  return {int(c["id"]): str(c["name"]) for c in sample["categories"]}


def detections_of(results: Sequence[dict], image_ids: Sequence[int]) -> dict[str, list[dict]]:
  """{str(image id): its MAX_RECORDED best COCO results, score descending} for image_ids."""
  wanted = {int(i): [] for i in image_ids}
  for r in results:
    if int(r["image_id"]) in wanted:
      wanted[int(r["image_id"])].append(r)
  return {
    str(i): sorted(rs, key=lambda r: -float(r["score"]))[:MAX_RECORDED] for i, rs in wanted.items()
  }


def read_records(record_dir: str) -> dict[int, str]:
  """{step: path} of the step_XXXXXXXX.json records in record_dir."""
  if not os.path.isdir(record_dir):
    return {}
  out = {}
  for name in os.listdir(record_dir):
    m = _STEP_FILE.match(name)
    if m:
      out[int(m.group(1))] = os.path.join(record_dir, name)
  return out


def record_evaluation(
  data_config: Any,
  workdir: str,
  step: int,
  results: Sequence[dict],
  num_images: int,
  num_tensorboard: int,
  coco_gt: Any = None,
) -> dict[str, np.ndarray]:
  """The trainer's record of one evaluation (module doc); returns its TensorBoard images.

  Args:
    data_config: config.data as evaluated (rethink_jax.train.eval_data_config).
    workdir: the run's workdir (records go to workdir/RECORD_DIR).
    step: the evaluated step.
    results: the evaluation's COCO results (every image).
    num_images: images in the sample (chosen on the first call of a workdir; 0: no record).
    num_tensorboard: how many of them go to TensorBoard.
    coco_gt: the split's pycocotools COCO (read from the data set when None).
  Returns:
    {"eval_images/IMAGE_ID": (1, h, w, 3) uint8 ground truth | detections}.
  """
  if num_images <= 0:
    return {}
  record_dir = os.path.join(workdir, RECORD_DIR)
  loaded = load_sample(record_dir)
  if loaded is None or loaded[0]["split"] != str(data_config.eval_split):
    if coco_gt is None:
      from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top

      coco_gt = pipeline.get_coco_gt(data_config)
    loaded = choose_sample(data_config, coco_gt, num_images)
    save_sample(record_dir, *loaded)
  sample, images = loaded
  detections = detections_of(results, sample["image_ids"])
  files.write_json(
    os.path.join(record_dir, f"step_{int(step):08d}.json"),
    {"step": int(step), "detections": detections},
  )
  out = {}
  names = category_names(sample)
  for image_id in sample["image_ids"][:num_tensorboard]:
    image = images[image_id]
    gt = draw(*fit(image, ground_truth(sample, image_id)))
    det = from_coco(detections[str(image_id)], image.shape[:2], names, sample.get("skeleton"))
    det = draw(*fit(image, det), score_thresh=SCORE_THRESH)
    out[f"eval_images/{image_id}"] = _hstack([np.asarray(gt), np.asarray(det)], 4)[None]
  return out


# ------------------------------------------------------------------------------------------------
# predictions.png of a comparison.
# ------------------------------------------------------------------------------------------------
def _arm_record_dir(arm: str, entry: dict, workdir: str) -> str | None:
  """The first of the arm's workdirs with a sample: the arm's own, then its seeds' runs (the
  first seed's), then the comparison's layout."""
  candidates = [entry.get("workdir"), *(r.get("workdir") for r in entry.get("runs") or [])]
  candidates.append(os.path.join(workdir, arm))
  for d in candidates:
    if d and os.path.exists(os.path.join(d, RECORD_DIR, SAMPLE_FILE)):
      return os.path.join(d, RECORD_DIR)
  return None


def prediction_columns(results: dict, workdir: str) -> tuple[list[dict], list[str]]:
  """The columns of predictions.png after ground truth, and notes on those left out.

  Each arm (fine-tune first) gives a column at 1x and one at its longest multiple, each the
  evaluation recorded at that very iteration (multiple x results["unit_steps"]).
  Returns (columns [{"title", "arm", "step", "record_dir", "path"}], notes [str]).
  """
  unit = int(results["unit_steps"])
  columns, notes = [], []
  arms = results["arms"]
  order = [a for a in _ARM_LABELS if a in arms] + sorted(a for a in arms if a not in _ARM_LABELS)
  for arm in order:
    entry = results["arms"][arm]
    label = _ARM_LABELS.get(arm, arm)
    multiples = sorted(float(m) for m in entry.get("multiples") or [1])
    wanted = sorted({1.0 if 1.0 in multiples else multiples[0], multiples[-1]})
    record_dir = _arm_record_dir(arm, entry, workdir)
    records = read_records(record_dir) if record_dir else {}
    for m in wanted:
      step = int(round(m * unit))
      if step in records:
        columns.append(
          {
            "title": f"{label} {m:g}x (iter {step})",
            "arm": arm,
            "step": step,
            "record_dir": record_dir,
            "path": records[step],
          }
        )
      else:
        notes.append(f"{label} {m:g}x: not recorded")
  return columns, notes


def _text_image(lines: Sequence[str], width: int, size: int, pad: int = 4) -> np.ndarray:
  """(h, width, 3) uint8: the lines in black on white."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top

  font = ImageFont.load_default(size=size)
  line_h = size + 4
  pil = Image.new("RGB", (width, pad * 2 + line_h * len(lines)), (255, 255, 255))
  pen = ImageDraw.Draw(pil)
  for k, line in enumerate(lines):
    pen.text((pad, pad + k * line_h), line, fill=(0, 0, 0), font=font)
  return np.asarray(pil)


def _cell(picture: Any, side: int) -> np.ndarray:
  """A drawn picture centred on a white side x side square."""
  out = np.full((side, side, 3), 255, np.uint8)
  arr = np.asarray(picture)[:side, :side]
  y, x = (side - arr.shape[0]) // 2, (side - arr.shape[1]) // 2
  out[y : y + arr.shape[0], x : x + arr.shape[1]] = arr
  return out


def _hstack(pictures: Sequence[np.ndarray], gap: int) -> np.ndarray:
  """(h, w, 3) uint8 pictures of one height side by side, `gap` white columns between."""
  white = np.full((pictures[0].shape[0], gap, 3), 255, np.uint8)
  parts = [p for pic in pictures for p in (white, pic)][1:]
  return np.concatenate(parts, axis=1)


def write_predictions_png(
  results: dict, workdir: str, score_thresh: float = SCORE_THRESH, side: int = CELL
) -> dict | None:
  """Writes workdir/predictions.png from the arms' records (module doc).

  Rows: the sampled validation images; columns: ground truth, then prediction_columns'.
  Columns nothing was recorded for are left out and named in the title.

  Args:
    results: compare's results dict (arms with "multiples" and "workdir"; "unit_steps").
    workdir: the comparison's workdir.
    score_thresh: detections drawn score at least this (stated in the title).
    side: pixels of each picture's square cell.
  Returns:
    the layout {"path", "image_ids", "columns" [titles], "notes", "cell", "gap", "title_h",
    "header_h"} (the grid starts at row title_h + header_h), or None (nothing written) when no
    arm has recorded an evaluation.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  columns, notes = prediction_columns(results, workdir)
  if not columns:
    return None
  sample, images = load_sample(columns[0]["record_dir"])
  for col in list(columns[1:]):
    other = files.read_json(os.path.join(col["record_dir"], SAMPLE_FILE))
    if other["image_ids"] != sample["image_ids"]:
      columns.remove(col)
      notes.append(f"{col['title']}: other images")
  names = category_names(sample)
  detections = {c["path"]: files.read_json(c["path"])["detections"] for c in columns}
  gap = 4
  titles = ["ground truth"] + [c["title"] for c in columns]
  width = len(titles) * (side + gap) - gap
  title = f"{len(sample['image_ids'])} validation images; detections with score >= {score_thresh:g}"
  title_img = _text_image([title] + ([f"left out: {'; '.join(notes)}"] if notes else []), width, 16)
  header = _hstack([_text_image([t], side, 13) for t in titles], gap)
  rows = [title_img, header]
  for image_id in sample["image_ids"]:
    image = images[image_id]
    cells = [draw(*fit(image, ground_truth(sample, image_id), side))]
    for c in columns:
      det = from_coco(
        detections[c["path"]].get(str(image_id), []),
        image.shape[:2],
        names,
        sample.get("skeleton"),
      )
      cells.append(draw(*fit(image, det, side), score_thresh=score_thresh))
    if len(rows) > 2:
      rows.append(np.full((gap, width, 3), 255, np.uint8))
    rows.append(_hstack([_cell(c, side) for c in cells], gap))
  path = os.path.join(workdir, "predictions.png")
  grid = Image.fromarray(np.concatenate(rows, axis=0))
  grid.save(path + ".tmp", format="PNG", optimize=True)
  if os.path.getsize(path + ".tmp") > MAX_PNG_BYTES:  # photographs (COCO) compress poorly
    grid.quantize(256).save(path + ".tmp", format="PNG", optimize=True)
  os.replace(path + ".tmp", path)
  return {
    "path": path,
    "image_ids": list(sample["image_ids"]),
    "columns": titles,
    "notes": notes,
    "cell": side,
    "gap": gap,
    "title_h": title_img.shape[0],
    "header_h": header.shape[0],
  }
