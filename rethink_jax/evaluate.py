"""COCO evaluation: fixed-shape detections -> COCO results (original pixels, RLE masks,
keypoints) -> AP.

Metric names (percent, 0..100; NaN where COCOeval reports -1, e.g. no ground truth of that size):
  "<type>/AP", "<type>/AP50", "<type>/AP75", "<type>/APs", "<type>/APm", "<type>/APl",
  "<type>/AR1", "<type>/AR10", "<type>/AR100", "<type>/ARs", "<type>/ARm", "<type>/ARl"
for <type> in ("bbox", "segm"), and COCOeval's ten keypoint numbers (OKS, 20 detections per image)
  "keypoints/AP", "keypoints/AP50", "keypoints/AP75", "keypoints/APm", "keypoints/APl",
  "keypoints/AR", "keypoints/AR50", "keypoints/AR75", "keypoints/ARm", "keypoints/ARl".

Keypoints follow Detectron2's COCO results: the model's [x, y, score] in input pixels are divided
by the image's scale, then x and y move by -0.5 (COCO's keypoints are integer pixel indices, the
model's are continuous coordinates with pixel centres at +0.5); "score" is the box's score. OKS
uses the data set's per-keypoint sigmas (pycocotools' params.kpt_oks_sigmas: COCO's person
sigmas are 0.026 .. 0.107) and only the keypoint categories (keypoint_category_ids).

Masks are pasted by one of two rules, chosen by name (PASTE_RULES):
  "detectron2" (paste_masks_in_image, the default): each pixel centre of the original image is
    mapped into the real-valued box, the M x M mask is read bilinearly with zero padding outside
    it, and the pixel is on when the value >= threshold;
  "torchvision" (torchvision's paste_masks_in_image, the original Detectron's): the mask gets a
    border of one zero cell, the box grows by the same factor (M + 2) / M about its centre and is
    truncated to whole pixels, the padded mask is resized bilinearly (align_corners=False) onto
    that integer box, and the pixel is on when the value > threshold.
Pasting runs in NumPy on the host, per detection on the box's window only: original image sizes
vary (a jitted paste would recompile for every size) and a whole-image paste does the work of
every pixel for every mask.
"""

from collections.abc import Callable, Iterable, Sequence
import contextlib
import copy
import io
import json
import os
from typing import Any

from absl import logging
import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import cocoeval
from pycocotools import mask as mask_utils

from rethink_jax import files

METRIC_NAMES = (
  "AP",
  "AP50",
  "AP75",
  "APs",
  "APm",
  "APl",
  "AR1",
  "AR10",
  "AR100",
  "ARs",
  "ARm",
  "ARl",
)
# COCOeval.summarize's stats for iouType "keypoints" (no small objects, maxDets 20).
KEYPOINT_METRIC_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm", "keypoints")


def metric_names(iou_type: str) -> tuple[str, ...]:
  """The metric names (without the "<type>/" prefix) COCOeval reports for `iou_type`."""
  if iou_type not in IOU_TYPES:
    raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
  return KEYPOINT_METRIC_NAMES if iou_type == "keypoints" else METRIC_NAMES


def _paste_weights(lo: float, hi: float, start: int, num: int, mask_size: int) -> np.ndarray:
  """(num, M) interpolation weights of pixels start..start+num-1 into a box [lo, hi] of M cells."""
  centers = np.arange(start, start + num, dtype=np.float64) + 0.5
  u = (centers - lo) / max(hi - lo, 1e-6) * mask_size - 0.5
  low = np.floor(u)
  frac = u - low
  weights = np.zeros((num, mask_size), np.float32)
  rows = np.arange(num)
  for idx, wgt in ((low, 1.0 - frac), (low + 1.0, frac)):
    ok = (idx >= 0) & (idx < mask_size)
    weights[rows[ok], idx[ok].astype(np.int64)] += wgt[ok]
  return weights


def paste_mask(
  mask: np.ndarray, box: Sequence[float], image_hw: Sequence[int], threshold: float = 0.5
) -> tuple[tuple[int, int, int, int], np.ndarray]:
  """Pastes one mask into its box of an image (Detectron2's rule, see the module doc).

  Args:
    mask: (M, M) float probabilities.
    box: (4,) xyxy in the image's pixels.
    image_hw: (h, w) of the image.
    threshold: pixel on when the interpolated value >= threshold.
  Returns:
    (window, local): window = (y0, y1, x0, x1) and local (y1 - y0, x1 - x0) bool, the only part of
    the (h, w) image that can be on.
  """
  mask = np.asarray(mask, np.float32)
  if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
    raise ValueError(f"paste_mask needs an (M, M) mask, got {mask.shape}")
  h, w = int(image_hw[0]), int(image_hw[1])
  m = mask.shape[0]
  x1, y1, x2, y2 = (float(v) for v in box)
  # Pixels whose centre reads a cell of the mask: within one cell of the box.
  cy, cx = (y2 - y1) / m, (x2 - x1) / m
  y0, y1_ = max(0, int(np.floor(y1 - cy))), min(h, int(np.ceil(y2 + cy)) + 1)
  x0, x1_ = max(0, int(np.floor(x1 - cx))), min(w, int(np.ceil(x2 + cx)) + 1)
  if y1_ <= y0 or x1_ <= x0:
    return (0, 0, 0, 0), np.zeros((0, 0), bool)
  wy = _paste_weights(y1, y2, y0, y1_ - y0, m)
  wx = _paste_weights(x1, x2, x0, x1_ - x0, m)
  # einsum without `optimize` runs its own loops: BLAS matmuls this small cost more in thread
  # hand-offs than in arithmetic.
  rows = np.einsum("ys,st->yt", wy, mask)
  return (y0, y1_, x0, x1_), np.einsum("yt,xt->yx", rows, wx) >= threshold


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """PyTorch's 1-D bilinear resampling (align_corners=False, no antialias) of in -> out samples.

  Output sample i reads (1 - frac[i]) * x[lo[i]] + frac[i] * x[hi[i]]: its source coordinate
  (i + 0.5) * in / out - 0.5 clamped at 0, rounded as torch's CPU kernel rounds it (a float32
  scale, the coordinate in float64, then float32): within one float32 ulp of torch's weights.
  Returns lo (out,) int64, hi (out,) int64, frac (out,) float32.
  """
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  src = (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0.0))
  lo = np.floor(src).astype(np.int64)
  frac = np.clip(src - lo.astype(np.float32), 0.0, 1.0).astype(np.float32)
  hi = lo + (lo < in_size - 1)
  return lo, hi, frac


def paste_mask_torchvision(
  mask: np.ndarray, box: Sequence[float], image_hw: Sequence[int], threshold: float = 0.5
) -> tuple[tuple[int, int, int, int], np.ndarray]:
  """Pastes one mask into its box of an image by torchvision's rule (see the module doc).

  Args and returns as paste_mask's; a pixel is on when the resized value > threshold.
  """
  mask = np.asarray(mask, np.float32)
  if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
    raise ValueError(f"paste_mask_torchvision needs an (M, M) mask, got {mask.shape}")
  h, w = int(image_hw[0]), int(image_hw[1])
  m = mask.shape[0]
  padded = np.pad(mask, 1)
  # float32 throughout, as torch computes the expanded box; then truncation towards zero.
  b = np.asarray(box, np.float32)
  scale = np.float32((m + 2) / m)
  half_w, half_h = (b[2] - b[0]) * np.float32(0.5) * scale, (b[3] - b[1]) * np.float32(0.5) * scale
  cx, cy = (b[2] + b[0]) * np.float32(0.5), (b[3] + b[1]) * np.float32(0.5)
  bx0, by0 = int(np.trunc(cx - half_w)), int(np.trunc(cy - half_h))
  bx1, by1 = int(np.trunc(cx + half_w)), int(np.trunc(cy + half_h))
  box_w, box_h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
  x0, x1 = max(bx0, 0), min(bx1 + 1, w)
  y0, y1 = max(by0, 0), min(by1 + 1, h)
  if y1 <= y0 or x1 <= x0:
    return (0, 0, 0, 0), np.zeros((0, 0), bool)
  # Only the rows / columns of the resized mask that land inside the image.
  ly, hy, fy = (t[y0 - by0 : y1 - by0] for t in bilinear_taps(m + 2, box_h))
  lx, hx, fx = (t[x0 - bx0 : x1 - bx0] for t in bilinear_taps(m + 2, box_w))
  rows = padded[ly] * (1 - fy)[:, None] + padded[hy] * fy[:, None]
  local = rows[:, lx] * (1 - fx)[None, :] + rows[:, hx] * fx[None, :]
  return (y0, y1, x0, x1), local > threshold


PASTE_RULES = {"detectron2": paste_mask, "torchvision": paste_mask_torchvision}


def paste_masks(
  masks: np.ndarray,
  boxes: np.ndarray,
  image_hw: Sequence[int],
  threshold: float = 0.5,
  rule: str = "detectron2",
) -> np.ndarray:
  """Pastes R masks into whole images.

  Args:
    masks: (R, M, M) float probabilities.
    boxes: (R, 4) xyxy in the image's pixels.
    image_hw: (h, w) of the image.
    threshold: pixel on when the interpolated value >= threshold ("torchvision": > threshold).
    rule: a PASTE_RULES name (see the module doc).
  Returns:
    (h, w, R) uint8 in {0, 1}, Fortran-ordered: the layout pycocotools' mask.encode takes.
  """
  masks = np.asarray(masks, np.float32)
  boxes = np.asarray(boxes, np.float64)
  if masks.ndim != 3 or boxes.shape != (len(masks), 4):
    raise ValueError(
      f"paste_masks needs masks (R, M, M) and boxes (R, 4), got {masks.shape} and {boxes.shape}"
    )
  if rule not in PASTE_RULES:
    raise ValueError(f"mask paste rule must be one of {sorted(PASTE_RULES)}, got {rule!r}")
  paste = PASTE_RULES[rule]
  h, w = int(image_hw[0]), int(image_hw[1])
  out = np.zeros((h, w, len(masks)), np.uint8, order="F")
  for r, (mask, box) in enumerate(zip(masks, boxes)):
    (y0, y1, x0, x1), local = paste(mask, box, (h, w), threshold)
    out[y0:y1, x0:x1, r] = local
  return out


def detections_to_coco(
  dets: dict,
  batch: dict,
  category_ids: Sequence[int],
  mask_threshold: float = 0.5,
  mask_paste: str = "detectron2",
) -> list[dict]:
  """Fixed-shape detections of one batch -> COCO result dicts (padding dropped).

  Args:
    dets: numpy dict: boxes (B, D, 4) xyxy input pixels, scores (B, D), classes (B, D) int32
      (1..K, 0 = padding), num_detections (B,), optional masks (B, D, M, M) probabilities,
      optional keypoints (B, D, P, 3) [x, y, score] input pixels.
    batch: the batch dict the detections came from (image_id, valid, scale, orig_hw).
    category_ids: COCO category id of label k at index k - 1.
    mask_threshold: pasted-mask threshold.
    mask_paste: the paste rule (PASTE_RULES name).
  Returns:
    list of {"image_id", "category_id", "bbox" [x, y, w, h] original pixels, "score",
    "segmentation" (compressed RLE, counts as str) when masks are given, "keypoints" (3P floats
    [x, y, score, ...] in COCO's integer-pixel convention, see the module doc) when keypoints
    are given}.
  """
  boxes = np.asarray(dets["boxes"], np.float64)
  scores = np.asarray(dets["scores"], np.float64)
  classes = np.asarray(dets["classes"])
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:2]:
    raise ValueError(
      f"detections need boxes (B, D, 4) and scores (B, D), got {boxes.shape} and {scores.shape}"
    )
  num = np.asarray(dets.get("num_detections", np.full(boxes.shape[0], boxes.shape[1])))
  masks = dets.get("masks")
  masks = None if masks is None else np.asarray(masks, np.float32)
  keypoints = dets.get("keypoints")
  if keypoints is not None:
    keypoints = np.asarray(keypoints, np.float64)
    if keypoints.ndim != 4 or keypoints.shape[:2] != boxes.shape[:2] or keypoints.shape[3] != 3:
      raise ValueError(f"keypoints must be (B, D, P, 3) beside boxes, got {keypoints.shape}")
  category_ids = np.asarray(category_ids)
  results = []
  for b in range(boxes.shape[0]):
    if not bool(batch["valid"][b]) or int(batch["image_id"][b]) < 0:
      continue
    image_id = int(batch["image_id"][b])
    h, w = (int(v) for v in batch["orig_hw"][b])
    scale = float(batch["scale"][b])
    n = int(num[b])
    keep = np.flatnonzero(classes[b, :n] > 0)
    if keep.size and classes[b, keep].max() > len(category_ids):
      raise ValueError(f"class {classes[b, keep].max()} beyond the {len(category_ids)} categories")
    orig = boxes[b, keep] / scale
    orig = np.clip(orig, 0.0, [w, h, w, h])
    rles = [None] * len(keep)
    if masks is not None and len(keep):
      rles = mask_utils.encode(
        paste_masks(masks[b, keep], orig, (h, w), mask_threshold, mask_paste)
      )
      for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    for i, (k, box) in enumerate(zip(keep, orig)):
      res = {
        "image_id": image_id,
        "category_id": int(category_ids[classes[b, k] - 1]),
        "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
        "score": float(scores[b, k]),
      }
      if rles[i] is not None:
        res["segmentation"] = rles[i]
      if keypoints is not None:
        kp = keypoints[b, k].copy()
        kp[:, :2] = kp[:, :2] / scale - 0.5
        res["keypoints"] = [float(v) for v in kp.reshape(-1)]
      results.append(res)
  return results


def _load_gt(coco_gt: Any) -> coco_lib.COCO:
  if isinstance(coco_gt, (str, os.PathLike)):
    with contextlib.redirect_stdout(io.StringIO()):
      return coco_lib.COCO(os.fspath(coco_gt))
  return coco_gt


def keypoint_category_ids(coco_gt: coco_lib.COCO) -> list[int]:
  """The categories OKS scores: those whose annotations carry "keypoints" and, when some category
  lists keypoint names (a person_keypoints file), only those."""
  anns = coco_gt.dataset.get("annotations", [])
  with_points = {int(a["category_id"]) for a in anns if "keypoints" in a}
  named = {int(c["id"]) for c in coco_gt.dataset.get("categories", []) if c.get("keypoints")}
  return sorted(with_points & named if named else with_points)


def _cocoeval(
  coco_gt: coco_lib.COCO,
  results: list[dict],
  iou_type: str,
  keypoint_oks_sigmas: Sequence[float] | None,
) -> cocoeval.COCOeval:
  """COCOeval of `results` (as given to loadRes) run through summarize()."""
  with contextlib.redirect_stdout(io.StringIO()) as out:
    coco_dt = coco_gt.loadRes(results)
    ev = cocoeval.COCOeval(coco_gt, coco_dt, iou_type)
    if iou_type == "keypoints":
      cat_ids = keypoint_category_ids(coco_gt)
      if not cat_ids:
        raise ValueError("keypoint evaluation needs ground truth with keypoints; it has none")
      ev.params.catIds = cat_ids
      num = len(results[0]["keypoints"]) // 3
      if keypoint_oks_sigmas is not None:
        ev.params.kpt_oks_sigmas = np.asarray(keypoint_oks_sigmas, np.float64)
      if len(ev.params.kpt_oks_sigmas) != num:
        raise ValueError(
          f"{num} keypoints per detection but {len(ev.params.kpt_oks_sigmas)} OKS sigmas: give "
          "the data set's keypoint_oks_sigmas"
        )
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  logging.info("COCOeval %s:\n%s", iou_type, out.getvalue())
  return ev


def coco_metrics(
  coco_gt: Any,
  results: list[dict],
  iou_types: Sequence[str] = ("bbox", "segm"),
  keypoint_oks_sigmas: Sequence[float] | None = None,
) -> dict[str, float]:
  """Scores COCO results with pycocotools' COCOeval.

  Args:
    coco_gt: a pycocotools COCO or the path of a COCO-format annotation file.
    results: list of COCO result dicts (detections_to_coco's output).
    iou_types: subset of IOU_TYPES ("bbox", "segm", "keypoints").
    keypoint_oks_sigmas: (P,) the data set's OKS sigma per keypoint (pycocotools' convention);
      None: pycocotools' default, COCO's 17 person keypoints.
  Returns:
    {"bbox/AP": ..., "segm/AP75": ..., "keypoints/AP": ...}: COCOeval's numbers per type
    (metric_names(type)), in percent.
  """
  coco_gt = _load_gt(coco_gt)
  metrics = {}
  for iou_type in iou_types:
    names = metric_names(iou_type)
    res = copy.deepcopy(results)  # loadRes writes into the dicts
    if iou_type == "segm":
      # With a "bbox" present, loadRes would score boxes turned into polygons, not the masks.
      res = [{k: v for k, v in r.items() if k != "bbox"} for r in res if "segmentation" in r]
    elif iou_type == "keypoints":
      # As Detectron2: the box stays, so a detection's area (for the size ranges) is its box's.
      res = [r for r in res if "keypoints" in r]
    if not res:
      logging.warning("no %s results to evaluate: every %s metric is 0", iou_type, iou_type)
      metrics.update({f"{iou_type}/{n}": 0.0 for n in names})
      continue
    ev = _cocoeval(coco_gt, res, iou_type, keypoint_oks_sigmas)
    for name, value in zip(names, ev.stats):
      metrics[f"{iou_type}/{name}"] = float(value * 100.0) if value >= 0 else float("nan")
  return metrics


def gather_results(results: list[dict]) -> list[dict]:
  """All processes' result lists, concatenated on every process (identity on one process)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return results
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  payload = np.frombuffer(json.dumps(results).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int64)))
  sizes = sizes.reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[: payload.size] = payload
  every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  out = []
  for p, n in enumerate(sizes):
    out.extend(json.loads(every[p, : int(n)].tobytes().decode()))
  return out


def evaluate(
  predict_fn: Callable[[dict], dict],
  eval_iterator: Iterable[dict],
  coco_gt: Any,
  category_ids: Sequence[int],
  *,
  iou_types: Sequence[str] | None = None,
  output_json: str | None = None,
  mask_threshold: float = 0.5,
  mask_paste: str = "detectron2",
  keypoint_oks_sigmas: Sequence[float] | None = None,
  return_results: bool = False,
) -> dict[str, float] | tuple[dict[str, float], list[dict]]:
  """Runs predict_fn over the eval iterator and scores the detections.

  Args:
    predict_fn: batch dict -> detections dict (numpy or jax arrays, host-local, shapes of
      detections_to_coco) for the batch's images.
    eval_iterator: pipeline.make_eval_iterator(...) of this process.
    coco_gt: pycocotools COCO of the eval split (pipeline.get_coco_gt) or its annotation file.
    category_ids: pipeline.category_ids(config.data).
    iou_types: default "bbox", with "segm" when detections have masks and "keypoints" when
      they have keypoints.
    output_json: if set, process 0 writes the COCO results there.
    mask_threshold: pasted-mask threshold.
    mask_paste: the paste rule (PASTE_RULES name; the model config's output.mask_paste).
    keypoint_oks_sigmas: the data set's OKS sigma per keypoint (coco_metrics).
    return_results: also return the COCO results of every process's images.
  Returns:
    the metrics dict of coco_metrics (the same on every process); with return_results,
    (metrics, COCO results of the whole split, the same on every process).
  """
  import jax  # pylint: disable=g-import-not-at-top

  results = []
  has_masks = has_keypoints = False
  for batch in eval_iterator:
    dets = jax.device_get(predict_fn(batch))
    dets = {k: np.asarray(v) for k, v in dets.items()}
    has_masks = has_masks or "masks" in dets
    has_keypoints = has_keypoints or "keypoints" in dets
    results.extend(detections_to_coco(dets, batch, category_ids, mask_threshold, mask_paste))
  results = gather_results(results)
  if iou_types is None:
    iou_types = ("bbox",) + ("segm",) * has_masks + ("keypoints",) * has_keypoints
  metrics = {}
  if jax.process_index() == 0:
    if output_json:
      files.write_json(output_json, results)
    metrics = coco_metrics(coco_gt, results, iou_types, keypoint_oks_sigmas)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    names = [f"{t}/{n}" for t in iou_types for n in metric_names(t)]
    values = np.asarray([metrics.get(n, 0.0) for n in names], np.float64)
    values = np.asarray(multihost_utils.broadcast_one_to_all(values))
    metrics = dict(zip(names, values.tolist()))
  return (metrics, results) if return_results else metrics
