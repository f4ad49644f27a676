r"""Predictor: a converted or trained Mask R-CNN on uint8 RGB images of any size.

  predictor = Predictor.from_checkpoint("weights/maskrcnn_R_50_FPN")  # or a training workdir
  [out] = predictor([image])  # image: (H, W, 3) uint8 RGB
  out["boxes"] (N, 4) xyxy float32 in the image's pixels, out["scores"] (N,), out["labels"] (N,)
  int, out["names"] (N,) str when the class names are known, out["masks"] (N, H, W) bool (models
  with a mask head), out["keypoints"] (N, K, 3) [x, y, score] in the image's continuous
  coordinates (keypoint models); sorted by score, highest first.

Command line (COCO-format results JSON + one PNG per image with the detections drawn):
  python -m rethink_jax.predict --checkpoint DIR --input IMAGE_OR_DIR --output DIR \
      [--score-thresh 0.5] [--tta [--tta-min-sizes 400,500,...] [--tta-max-size 4000] \
      [--no-tta-flip]]

What happens to an image, following model_config.input / output:
  1. resize (resize=True) by input.resize, to shorter side min_size_test and longer side at most
     max_size_test (RESIZE_RULES; min_size_test 0 = no resize). "detectron2": ResizeShortestEdge's
     size (output_size_detectron2) and PIL's bilinear resize of the uint8 image; "torchvision":
     GeneralizedRCNNTransform.resize's size (output_size_torchvision) and PyTorch's bilinear
     interpolation (align_corners=False) of the normalised float image; "rethink_jax": this
     project's input pipeline (output_size_rethink_jax, the same interpolation).
  2. channels flipped to BGR when input.format is "BGR", (pixel - pixel_mean) / pixel_std.
  3. padded with zeros (bottom / right) into a canvas, by `padding`:
       "bucket" (default): the smallest of a fixed set of canvases (shape_buckets), so a new image
         size does not compile the model again;
       "image": the image's own size rounded up to input.size_divisibility (Detectron2's and
         torchvision's predictors on one image; one compilation per distinct size);
       "batch": every image of the call in one batch, padded to the largest rounded up
         (Detectron2 / torchvision models called on that list).
     The padding changes what GroupNorm (and the border of every conv) sees, so the padding
     that reproduces a reference's outputs exactly is the reference's own ("image" or "batch").
  4. the model (one jitted executable per canvas shape and batch size: `compilations`).
  5. detections mapped back to the original image by the resize rule's own inverse:
     "detectron2": boxes times (w / new_w, h / new_h), clipped to the image, empty boxes
     dropped (detector_postprocess); "torchvision": times the float32 ratios, not clipped
     (transform.postprocess); "rethink_jax": divided by the pipeline's scale and clipped
     (evaluate.detections_to_coco). Masks pasted at the original size by output.mask_paste
     (evaluate.PASTE_RULES) with threshold 0.5.
  6. label of class k (1..K) = k - 1 + output.first_label; meta["class_names"] holds the K names
     in class order (list), or a dict {str(label): name}.

Shape buckets (shape_buckets): canvas sides are taken from the ladder
  ceil(max_size_test), ceil(min_size_test), ceil(min_size_test / 2), ceil(min_size_test / 4), ...
(ceil = rounded up to size_divisibility; halving while the value is above 2 * size_divisibility),
and an image goes into the canvas whose height and width are each the smallest rung holding it.
For 800 / 1333 the rungs are 1344, 800, 416, 224, 128, 64: a resized landscape image goes into
800 x 1344, a portrait one into 1344 x 800, a square one into 800 x 800; smaller images
(resize=False, or a side cut by max_size_test) into the smaller rungs. An image larger than the
top rung gets its own canvas (rounded up).

Test-time augmentation (Predictor(..., tta={...}), --tta): Detectron2's GeneralizedRCNNWithTTA,
the same as the trainer's evaluation with eval.tta (rethink_jax.tta: the same jitted pieces, the
same merge and mask averaging). tta holds tta.default_tta_config's fields: min_sizes (default 400,
500, ..., 1200), max_size (4000), flip (True); missing fields take those defaults. Every image is
resized by input.resize to each min size (longer side at most max_size), unflipped and, with
flip, mirrored after resizing; every view's detections go back to original pixels by the resize's
per-axis scale (mirrored back within the view's width); the union is merged once (clip, scores >
1e-8, per-class NMS at roi_heads.nms_thresh_test, the detections_per_image best); the mask head
runs on the merged boxes in every view and the probabilities, mirrored ones mirrored back, are
averaged, then pasted as in step 5 ("detectron2": the merged boxes clipped, empty ones dropped).
Canvases follow `padding` per view: "bucket" takes a ladder per min size (tta_bucket_sides): the
one above for shorter side min size and longer side max_size_test * min size / min_size_test
(the model's ladder scaled to the view), plus rungs growing by TTA_RUNG_RATIO up to max_size for
the longer images that max_size lets through; so one detect and one mask program compile per view
canvas and batch size, and one merge and one average per batch size (all counted in
`compilations`), not one per image size; "image" and "batch" as above. TTA always
resizes (resize=False is refused) and refuses keypoint models (NotImplementedError), as
Detectron2's does; a model without a mask head gets merged boxes only.
"""

import argparse
import collections
from collections.abc import Mapping, Sequence
import dataclasses
import math
import os
import sys
import time
from typing import Any, Optional

import ml_collections
import numpy as np

from rethink_jax import evaluate
from rethink_jax import files
from rethink_jax import visualize

RESIZE_RULES = ("detectron2", "torchvision", "rethink_jax")
PADDINGS = ("bucket", "image", "batch")
MASK_THRESHOLD = 0.5
TTA_RUNG_RATIO = 1.5  # TTA ladders: rungs above the scaled top grow by this factor to max_size
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


# ------------------------------------------------------------------------------------------------
# Resizing.
# ------------------------------------------------------------------------------------------------
def default_input_config() -> ml_collections.ConfigDict:
  """A copy of default_model_config().input (Detectron2's: BGR, 800 / 1333, PIL bilinear)."""
  from rethink_jax.models import config  # pylint: disable=g-import-not-at-top

  return config.default_model_config().input


def output_size_detectron2(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
  """Detectron2's ResizeShortestEdge.get_output_shape: (new_h, new_w), rounded by int(x + 0.5)."""
  scale = short * 1.0 / min(h, w)
  new_h, new_w = (short * 1.0, scale * w) if h < w else (scale * h, short * 1.0)
  if max(new_h, new_w) > max_size:
    scale = max_size * 1.0 / max(new_h, new_w)
    new_h, new_w = new_h * scale, new_w * scale
  return int(new_h + 0.5), int(new_w + 0.5)


def output_size_torchvision(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
  """torchvision's GeneralizedRCNNTransform.resize: one scale, sizes floor(side * scale)."""
  scale = min(float(short) / min(h, w), float(max_size) / max(h, w))
  return int(math.floor(h * scale)), int(math.floor(w * scale))


def _pipeline_scale(h: int, w: int, short: int, max_size: int) -> np.float32:
  """rethink_jax.data.pipeline's scale (float32, as tf computes it)."""
  hf, wf = np.float32(h), np.float32(w)
  return min(np.float32(short) / min(hf, wf), np.float32(max_size) / max(hf, wf))


def output_size_rethink_jax(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
  """This project's input pipeline: round(side * scale) (round half to even, as tf.round)."""
  scale = _pipeline_scale(h, w, short, max_size)
  return int(np.round(np.float32(h) * scale)), int(np.round(np.float32(w) * scale))


OUTPUT_SIZE = {
  "detectron2": output_size_detectron2,
  "torchvision": output_size_torchvision,
  "rethink_jax": output_size_rethink_jax,
}


def resize_bilinear(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """PyTorch's F.interpolate(mode="bilinear", align_corners=False) of a float (H, W, C) image."""
  image = np.asarray(image, np.float32)
  (ly, hy, fy), (lx, hx, fx) = (
    evaluate.bilinear_taps(image.shape[0], int(size[0])),
    evaluate.bilinear_taps(image.shape[1], int(size[1])),
  )
  rows = image[ly] * (1 - fy)[:, None, None] + image[hy] * fy[:, None, None]
  return rows[:, lx] * (1 - fx)[None, :, None] + rows[:, hx] * fx[None, :, None]


def resize_pil_bilinear(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Detectron2's ResizeTransform of a uint8 image: PIL bilinear to (new_h, new_w)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  new_h, new_w = int(size[0]), int(size[1])
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def _check_image(image: Any) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
    raise ValueError(f"images must be uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
  return image


def preprocess(
  image: np.ndarray, input_config: ml_collections.ConfigDict, resize: bool = True
) -> np.ndarray:
  """One uint8 RGB (H, W, 3) image -> the model's normalised float32 (h, w, 3), unpadded."""
  image = _check_image(image)
  c = input_config
  if c.resize not in RESIZE_RULES:
    raise ValueError(f"model_config.input.resize must be one of {RESIZE_RULES}, got {c.resize!r}")
  if c.format not in ("RGB", "BGR"):
    raise ValueError(f"model_config.input.format must be 'RGB' or 'BGR', got {c.format!r}")
  h, w = image.shape[:2]
  size = (h, w)
  if resize and int(c.min_size_test) > 0:
    size = OUTPUT_SIZE[c.resize](h, w, int(c.min_size_test), int(c.max_size_test))
  if c.resize == "detectron2" and size != (h, w):
    image = resize_pil_bilinear(image, size)
  x = image.astype(np.float32)
  if c.format == "BGR":
    x = x[..., ::-1]
  x = (x - np.asarray(c.pixel_mean, np.float32)) / np.asarray(c.pixel_std, np.float32)
  if c.resize != "detectron2" and size != (h, w):
    x = resize_bilinear(x, size)  # the float image: torchvision normalises before resizing
  return x


# ------------------------------------------------------------------------------------------------
# Canvas shapes.
# ------------------------------------------------------------------------------------------------
def _round_up(x: float, d: int) -> int:
  return int(math.ceil(x / d) * d)


def bucket_sides(input_config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The ladder of canvas sides (ascending) derived from the resize rule (module doc)."""
  d = max(1, int(input_config.size_divisibility))
  short = int(input_config.min_size_test) or int(input_config.max_size_test)
  sides = {_round_up(input_config.max_size_test, d), _round_up(short, d)}
  side = float(short)
  while _round_up(side, d) > 2 * d:
    side /= 2
    sides.add(_round_up(side, d))
  return tuple(sorted(sides))


def shape_buckets(input_config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
  """Every canvas (H, W) of padding="bucket", in ascending area."""
  sides = bucket_sides(input_config)
  return sorted(((h, w) for h in sides for w in sides), key=lambda s: (s[0] * s[1], s))


def canvas_for(
  h: int,
  w: int,
  input_config: ml_collections.ConfigDict,
  sides: Optional[Sequence[int]] = None,
) -> tuple[int, int]:
  """padding="bucket": the canvas of an (h, w) model input (own rounded size above the ladder
  `sides`, by default bucket_sides(input_config))."""
  d = max(1, int(input_config.size_divisibility))
  sides = bucket_sides(input_config) if sides is None else sorted(sides)
  pick = lambda x: next((s for s in sides if s >= x), _round_up(x, d))
  return pick(h), pick(w)


def tta_bucket_sides(
  input_config: ml_collections.ConfigDict, size: int, max_size: int
) -> tuple[int, ...]:
  """The ladder of canvas sides of the TTA views of shorter side `size` (module doc)."""
  d = max(1, int(input_config.size_divisibility))
  top = float(max_size)
  if int(input_config.min_size_test) > 0:
    top = min(top, float(input_config.max_size_test) * size / int(input_config.min_size_test))
  view = ml_collections.ConfigDict(input_config.to_dict(), type_safe=False)
  view.update(min_size_test=int(size), max_size_test=top)
  sides = set(bucket_sides(view))
  while top < max_size:
    top = min(float(max_size), top * TTA_RUNG_RATIO)
    sides.add(_round_up(top, d))
  return tuple(sorted(sides))


# ------------------------------------------------------------------------------------------------
# Mapping detections back.
# ------------------------------------------------------------------------------------------------
def boxes_to_original(
  boxes: np.ndarray,
  input_hw: Sequence[int],
  orig_hw: Sequence[int],
  rule: str,
  pipeline_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
  """(N, 4) boxes in model-input pixels -> original pixels by the resize rule's inverse.

  pipeline_scale: the "rethink_jax" rule's resized / original scale (1 without resizing).
  Returns (boxes (N, 4) float32, keep (N,) bool: False for boxes the rule drops).
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  (h1, w1), (h0, w0) = (int(v) for v in input_hw), (int(v) for v in orig_hw)
  keep = np.ones(len(boxes), bool)
  limits = np.array([w0, h0, w0, h0], np.float32)
  if rule == "torchvision":
    ratio = limits / np.array([w1, h1, w1, h1], np.float32)
    return boxes * ratio, keep
  if rule == "detectron2":
    out = np.clip(boxes * np.array([w0 / w1, h0 / h1] * 2, np.float32), 0.0, limits)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])  # Boxes.nonempty()
    return out, keep
  if rule == "rethink_jax":
    return np.clip(boxes / np.float32(pipeline_scale), 0.0, limits).astype(np.float32), keep
  raise ValueError(f"resize rule must be one of {RESIZE_RULES}, got {rule!r}")


def keypoints_to_original(
  keypoints: np.ndarray,
  input_hw: Sequence[int],
  orig_hw: Sequence[int],
  rule: str,
  pipeline_scale: float = 1.0,
) -> np.ndarray:
  """(N, K, 3) [x, y, score] in model-input pixels -> original pixels by the resize rule's
  inverse (Detectron2's and torchvision's postprocess scale x and y, and clip nothing)."""
  points = np.array(keypoints, np.float32).reshape(-1, np.shape(keypoints)[-2], 3)
  (h1, w1), (h0, w0) = (int(v) for v in input_hw), (int(v) for v in orig_hw)
  if rule in ("torchvision", "detectron2"):
    points[..., :2] *= np.array([w0 / w1, h0 / h1], np.float32)
  elif rule == "rethink_jax":
    points[..., :2] /= np.float32(pipeline_scale)
  else:
    raise ValueError(f"resize rule must be one of {RESIZE_RULES}, got {rule!r}")
  return points


# ------------------------------------------------------------------------------------------------
# The Predictor.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Prepared:
  image: np.ndarray  # (h, w, 3) float32, normalised
  orig_hw: tuple[int, int]


class Predictor:
  """A Mask R-CNN on lists of uint8 RGB images (see the module doc).

  Attributes:
    model_config: the model config (default_model_config() layout, input / output included).
    meta: the checkpoint's meta (source, class_names, ...).
    class_names: K names in class order, or None.
    compilations: number of model executables compiled so far (one per canvas and batch size;
      with TTA, its programs per view canvas and batch size too).
    tta: the test-time augmentation config (FrozenConfigDict), or None.
  """

  def __init__(
    self,
    variables: dict,
    model_config: ml_collections.ConfigDict,
    meta: Optional[dict] = None,
    *,
    padding: str = "bucket",
    batch_size: int = 1,
    tta: Optional[Mapping[str, Any]] = None,
  ):
    """variables {"params", [collections]} of build_model(model_config); padding: PADDINGS;
    batch_size: images per model call for "bucket" / "image" (the last call is filled up);
    tta: None, or test-time augmentation with default_tta_config's fields min_sizes, max_size,
    flip (missing ones take Detectron2's defaults; enabled=False turns it off)."""
    import jax  # pylint: disable=g-import-not-at-top

    from rethink_jax.models import mask_rcnn  # pylint: disable=g-import-not-at-top

    if padding not in PADDINGS:
      raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    config = mask_rcnn.default_model_config()
    config.update(ml_collections.ConfigDict(model_config).to_dict())
    self.model_config = ml_collections.FrozenConfigDict(config)
    if self.model_config.input.resize not in RESIZE_RULES:
      raise ValueError(
        f"model_config.input.resize must be one of {RESIZE_RULES}, "
        f"got {self.model_config.input.resize!r}"
      )
    if self.model_config.output.mask_paste not in evaluate.PASTE_RULES:
      raise ValueError(
        f"model_config.output.mask_paste must be one of {sorted(evaluate.PASTE_RULES)}, "
        f"got {self.model_config.output.mask_paste!r}"
      )
    self.meta = dict(meta or {})
    self.padding = padding
    self.batch_size = max(1, int(batch_size))
    self.model = mask_rcnn.build_model(self.model_config)
    self.variables = jax.device_put(dict(variables))
    self._executables = {}  # (program name, argument shapes and dtypes) -> compiled program
    self._apply = self._compiled("model", jax.jit(lambda v, b: self.model.apply(v, b, train=False)))
    self.class_names = _class_names(self.meta.get("class_names"), self.model_config)
    self.tta = None
    fields = dict(tta.to_dict() if hasattr(tta, "to_dict") else (tta or {}))
    if tta is not None and fields.pop("enabled", True):
      from rethink_jax import tta as tta_lib  # pylint: disable=g-import-not-at-top

      config = tta_lib.default_tta_config()
      if "min_sizes" in fields:
        fields["min_sizes"] = tuple(int(v) for v in fields["min_sizes"])
      config.update(fields)
      config.enabled = True
      self._init_tta(ml_collections.FrozenConfigDict(config))

  # -- Construction from a directory ------------------------------------------------------------
  @classmethod
  def from_checkpoint(cls, directory: str, step: Optional[int] = None, **kwargs) -> "Predictor":
    """A converted detector directory (detector_checkpoint) or a training workdir.

    A workdir (config.json + checkpoints/) gives its latest checkpoint (or `step`), its model
    config and, from its data config, the input: channel order, mean / std, sizes (the pipeline's
    resize rule "rethink_jax") and the data set's class names when it can be read.
    """
    from rethink_jax import detector_checkpoint  # pylint: disable=g-import-not-at-top

    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, "model_config.json")):
      variables, model_config, meta = detector_checkpoint.load_detector(directory)
      return cls(variables, model_config, meta, **kwargs)
    if os.path.exists(os.path.join(directory, "config.json")) and os.path.isdir(
      os.path.join(directory, "checkpoints")
    ):
      variables, model_config, meta = load_workdir(directory, step)
      return cls(variables, model_config, meta, **kwargs)
    raise FileNotFoundError(
      f"{directory} is neither a detector checkpoint directory (model_config.json, meta.json, "
      "variables) nor a training workdir (config.json, checkpoints/)."
    )

  # -- Running ----------------------------------------------------------------------------------
  @property
  def compilations(self) -> int:
    return len(self._executables)

  @property
  def compiled_shapes(self) -> list[tuple[int, ...]]:
    """(B, H, W, 3) of every compiled executable of the plain model."""
    return sorted(key[1][0] for key in self._executables if key[0] == "model")

  def _compiled(self, name: str, program: Any) -> Any:
    """The jitted `program`, compiled once per shape and dtype of its arguments other than
    `self.variables` (fixed for a predictor); counted in `compilations`."""
    import jax  # pylint: disable=g-import-not-at-top

    def call(*args):
      shaped = jax.tree.leaves([a for a in args if a is not self.variables])
      key = (name,) + tuple((np.shape(x), str(np.result_type(x))) for x in shaped)
      if key not in self._executables:
        self._executables[key] = program.lower(*args).compile()
      return self._executables[key](*args)

    return call

  def _run(self, images: np.ndarray, image_hw: np.ndarray) -> dict[str, np.ndarray]:
    import jax  # pylint: disable=g-import-not-at-top

    out = self._apply(self.variables, {"image": images, "image_hw": image_hw})
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

  def _canvas(self, h: int, w: int) -> tuple[int, int]:
    if self.padding == "bucket":
      return canvas_for(h, w, self.model_config.input)
    d = max(1, int(self.model_config.input.size_divisibility))
    return _round_up(h, d), _round_up(w, d)

  def run_padded(self, prepared: Sequence[np.ndarray], canvas: Sequence[int]) -> dict:
    """The model on normalised (h, w, 3) images padded into one (len, H, W, 3) batch: its raw
    fixed-shape outputs (numpy)."""
    return self._run(*_pad(prepared, canvas))

  def __call__(self, images: Sequence[np.ndarray], resize: bool = True) -> list[dict]:
    """Detections of each image (module doc): list of dicts boxes, scores, labels, [names],
    [masks], [keypoints]."""
    if self.tta:
      if not resize:
        raise ValueError("test-time augmentation resizes every view: it needs resize=True")
      return self._call_tta(images)
    prep = [
      _Prepared(preprocess(im, self.model_config.input, resize), np.shape(im)[:2]) for im in images
    ]
    raw = [None] * len(prep)
    if self.padding == "batch" and prep:
      hmax = max(p.image.shape[0] for p in prep)
      wmax = max(p.image.shape[1] for p in prep)
      out = self.run_padded([p.image for p in prep], self._canvas(hmax, wmax))
      raw = [{k: v[i] for k, v in out.items()} for i in range(len(prep))]
    else:
      groups = collections.defaultdict(list)
      for i, p in enumerate(prep):
        groups[self._canvas(*p.image.shape[:2])].append(i)
      for canvas, idx in groups.items():
        for s in range(0, len(idx), self.batch_size):
          chunk = idx[s : s + self.batch_size]
          batch = [prep[i].image for i in chunk]
          batch += [batch[-1]] * (self.batch_size - len(batch))  # fill: fixed batch shape
          out = self.run_padded(batch, canvas)
          for j, i in enumerate(chunk):
            raw[i] = {k: v[j] for k, v in out.items()}
    return [self._postprocess(r, p.image.shape[:2], p.orig_hw) for r, p in zip(raw, prep)]

  # -- Test-time augmentation -------------------------------------------------------------------
  def _init_tta(self, config: ml_collections.FrozenConfigDict) -> None:
    from rethink_jax import tta as tta_lib  # pylint: disable=g-import-not-at-top

    tta_lib.check_supported(self.model_config)
    if not config.min_sizes:
      raise ValueError("tta.min_sizes is empty")
    self.tta = config
    self._tta_views = tta_lib.views(config)
    programs = tta_lib.make_programs(self.model, self.model_config, [f for _, f in self._tta_views])
    self._tta_programs = {k: self._compiled(k, f) for k, f in programs.items()}
    c = self.model_config.input
    self._tta_inputs, self._tta_sides = [], []
    for size in config.min_sizes:
      resize = ml_collections.ConfigDict(c.to_dict())
      resize.update(min_size_test=int(size), max_size_test=int(config.max_size))
      self._tta_inputs.append(resize)
      self._tta_sides.append(tta_bucket_sides(c, int(size), int(config.max_size)))

  def _tta_view(self, image: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    """The i-th min size's view of an image: (normalised (h, w, 3), scale [y, x] view / orig)."""
    rule_config = self._tta_inputs[i]
    x = preprocess(image, rule_config, True)
    (h0, w0), (h1, w1) = image.shape[:2], x.shape[:2]
    if rule_config.resize == "rethink_jax":
      scale = _pipeline_scale(
        h0, w0, int(rule_config.min_size_test), int(rule_config.max_size_test)
      )
      return x, np.full(2, scale, np.float32)
    return x, np.asarray([h1 / h0, w1 / w0], np.float32)

  def _tta_canvas(self, h: int, w: int, i: int) -> tuple[int, int]:
    if self.padding == "bucket":
      return canvas_for(h, w, self.model_config.input, self._tta_sides[i])
    return self._canvas(h, w)

  def _call_tta(self, images: Sequence[np.ndarray]) -> list[dict]:
    """__call__ with TTA: the images grouped by their views' canvases (one batch each)."""
    images = [_check_image(im) for im in images]
    sizes = range(len(self.tta.min_sizes))
    views = [[self._tta_view(im, i) for i in sizes] for im in images]
    if self.padding == "batch":
      canvases = [self._canvas(*np.max([v[i][0].shape[:2] for v in views], axis=0)) for i in sizes]
      chunks = [(tuple(canvases), list(range(len(images))))] if images else []
    else:
      groups = collections.defaultdict(list)
      for j, v in enumerate(views):
        groups[tuple(self._tta_canvas(*v[i][0].shape[:2], i) for i in sizes)].append(j)
      chunks = [
        (canvases, idx[s : s + self.batch_size])
        for canvases, idx in groups.items()
        for s in range(0, len(idx), self.batch_size)
      ]
    raw = [None] * len(images)
    for canvases, chunk in chunks:
      fill = chunk
      if self.padding != "batch":
        fill = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # fixed batch shape
      out = self.run_tta_padded(
        [views[j] for j in fill], [images[j].shape[:2] for j in fill], canvases
      )
      for k, j in enumerate(chunk):
        raw[j] = {key: v[k] for key, v in out.items()}
    return [self._postprocess(r, im.shape[:2], im.shape[:2]) for r, im in zip(raw, images)]

  def run_tta_padded(
    self,
    views: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]],
    orig_hw: Sequence[Sequence[int]],
    canvases: Sequence[Sequence[int]],
  ) -> dict:
    """TTA (tta.predict_views) of a batch: views[b][i] (normalised (h, w, 3), scale [y, x]) of
    image b at min size i, padded into canvases[i]; its raw fixed-shape outputs (numpy), boxes
    (B, D, 4) in original pixels, masks (B, D, M, M) averaged probabilities."""
    import jax  # pylint: disable=g-import-not-at-top

    from rethink_jax import tta as tta_lib  # pylint: disable=g-import-not-at-top

    batches = []
    for i, canvas in enumerate(canvases):
      image, image_hw = _pad([v[i][0] for v in views], canvas)
      scale = np.stack([v[i][1] for v in views]).astype(np.float32)
      batches.append({"image": image, "image_hw": image_hw, "scale": scale})
    orig_hw = np.asarray(orig_hw, np.int32).reshape(-1, 2)
    out = tta_lib.predict_views(
      self._tta_programs, self.variables, batches, self._tta_views, orig_hw
    )
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

  def _postprocess(self, raw: dict, input_hw: Sequence[int], orig_hw: Sequence[int]) -> dict:
    n = int(raw["num_detections"])
    classes = np.asarray(raw["classes"][:n])
    keep = np.flatnonzero(classes > 0)
    c = self.model_config.input
    scale = 1.0
    if c.resize == "rethink_jax" and tuple(input_hw) != tuple(orig_hw):
      scale = _pipeline_scale(*orig_hw, int(c.min_size_test), int(c.max_size_test))
    boxes, ok = boxes_to_original(raw["boxes"][keep], input_hw, orig_hw, c.resize, scale)
    keep, boxes = keep[ok], boxes[ok]
    scores = np.asarray(raw["scores"][keep], np.float32)
    order = np.argsort(-scores, kind="stable")
    keep, boxes, scores = keep[order], boxes[order], scores[order]
    classes = classes[keep]
    h, w = int(orig_hw[0]), int(orig_hw[1])
    labels = (classes.astype(np.int64) - 1 + int(self.model_config.output.first_label)).astype(
      np.int64
    )
    out = {"boxes": boxes, "scores": scores, "labels": labels}
    if "masks" in raw:
      masks = np.zeros((0, h, w), bool)
      if len(keep):
        masks = evaluate.paste_masks(
          raw["masks"][keep], boxes, (h, w), MASK_THRESHOLD, self.model_config.output.mask_paste
        )
        masks = np.ascontiguousarray(masks.transpose(2, 0, 1)).astype(bool)
      out["masks"] = masks
    if "keypoints" in raw:
      out["keypoints"] = keypoints_to_original(
        raw["keypoints"][keep], input_hw, orig_hw, c.resize, scale
      )
    if self.class_names is not None:
      out["names"] = [self.class_names[int(k) - 1] for k in classes]
    return out


def _pad(prepared: Sequence[np.ndarray], canvas: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Normalised (h, w, 3) images zero-padded into (len, H, W, 3) images and their (len, 2) hw."""
  hc, wc = int(canvas[0]), int(canvas[1])
  images = np.zeros((len(prepared), hc, wc, 3), np.float32)
  image_hw = np.zeros((len(prepared), 2), np.int32)
  for i, x in enumerate(prepared):
    images[i, : x.shape[0], : x.shape[1]] = x
    image_hw[i] = x.shape[:2]
  return images, image_hw


def _class_names(names: Any, model_config: ml_collections.ConfigDict) -> Optional[list[str]]:
  """meta["class_names"] (a list in class order or {str(label): name}) -> K names, or None."""
  k = int(model_config.num_classes)
  if names is None:
    return None
  if isinstance(names, dict):
    first = int(model_config.output.first_label)
    return [str(names.get(str(c - 1 + first), c - 1 + first)) for c in range(1, k + 1)]
  names = [str(n) for n in names]
  if len(names) != k:
    raise ValueError(f"meta class_names has {len(names)} names for {k} classes")
  return names


# ------------------------------------------------------------------------------------------------
# Training workdirs.
# ------------------------------------------------------------------------------------------------
def load_workdir(
  workdir: str, step: Optional[int] = None
) -> tuple[dict, ml_collections.ConfigDict, dict]:
  """(variables, model config, meta) of a training workdir's checkpoint (latest or `step`)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from rethink_jax.models import mask_rcnn  # pylint: disable=g-import-not-at-top

  config = files.read_json(os.path.join(workdir, "config.json"))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  if not steps:
    raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise FileNotFoundError(f"{ckpt_dir} has no step {step} (steps: {steps})")
  state = ocp.PyTreeCheckpointer().restore(os.path.join(ckpt_dir, str(step), "default"))
  variables = {"params": state["params"], **state.get("collections", {})}
  variables = _numpy_tree(variables)
  model_config = mask_rcnn.default_model_config()
  model_config.update(config["model"])
  data = config.get("data", {})
  inp = model_config.input
  inp.format = data.get("input_format", inp.format)
  inp.pixel_mean = tuple(data.get("pixel_mean", inp.pixel_mean))
  inp.pixel_std = tuple(data.get("pixel_std", inp.pixel_std))
  min_size = data.get("min_size", inp.min_size_test)
  min_size_test = int(data.get("min_size_test", 0) or 0) or int(np.max(min_size))
  inp.min_size_test = min_size_test
  inp.max_size_test = int(data.get("max_size", inp.max_size_test))
  inp.resize = "rethink_jax"
  model_config.output.first_label = 0
  meta = {
    "source": "rethink_jax",
    "workdir": workdir,
    "step": step,
    # The custom-data recipe records both in config.json; other data sets name their classes.
    "class_names": data.get("class_names") or _dataset_class_names(data),
    "category_ids": data.get("category_ids") or None,
  }
  return variables, model_config, meta


def _numpy_tree(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree)


def _dataset_class_names(data: dict) -> Optional[list[str]]:
  """The data set's category names (index = label - 1), or None when it cannot be read."""
  try:
    from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    config = pipeline.default_data_config()
    config.update({k: v for k, v in data.items() if k in config})
    categories = pipeline.get_builder(config, prepare=False).info.metadata["categories"]
    return [str(c["name"]) for c in categories]
  except Exception:  # pylint: disable=broad-except
    return None  # names are a convenience: an unprepared data set gives labels only


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------
def list_images(path: str) -> list[str]:
  """An image file, or the image files of a directory in name order."""
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(path, n) for n in names]
  if not os.path.exists(path):
    raise FileNotFoundError(path)
  return [path]


def read_image(path: str) -> np.ndarray:
  """uint8 RGB (H, W, 3), EXIF orientation applied (as Detectron2's read_image)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageOps  # pylint: disable=g-import-not-at-top

  with Image.open(path) as im:
    return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def image_ids(paths: Sequence[str]) -> list[int]:
  """COCO image ids: the file names when every one is a distinct integer (COCO's 000000139.jpg),
  else the position in file order starting at 1."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  if all(s.isdigit() for s in stems) and len(set(int(s) for s in stems)) == len(stems):
    return [int(s) for s in stems]
  return list(range(1, len(paths) + 1))


def to_coco(
  result: dict, image_id: int, category_ids: Optional[Sequence[int]] = None
) -> list[dict]:
  """One image's predictions -> COCO result dicts (RLE segmentation); category_id is the label,
  or category_ids[label] when the data set's ids are given (labels 0..K-1)."""
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top

  out = []
  rles = None
  if result.get("masks") is not None:
    masks = np.asarray(result["masks"])
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
  for i, (box, score, label) in enumerate(zip(result["boxes"], result["scores"], result["labels"])):
    x0, y0, x1, y1 = (float(v) for v in box)
    entry = {
      "image_id": int(image_id),
      "category_id": int(label if category_ids is None else category_ids[int(label)]),
      "bbox": [x0, y0, x1 - x0, y1 - y0],
      "score": float(score),
    }
    if rles is not None:
      entry["segmentation"] = {"size": list(rles[i]["size"]), "counts": rles[i]["counts"].decode()}
    if result.get("keypoints") is not None:
      points = np.array(result["keypoints"][i], np.float64)
      points[:, :2] -= 0.5  # COCO's integer pixel indices (Detectron2's instances_to_coco_json)
      entry["keypoints"] = [float(v) for v in points.reshape(-1)]
    out.append(entry)
  return out


class Progress:
  """A one-line progress report: done / total, images per second and the time left."""

  def __init__(self, total: int, stream=None, every_s: float = 2.0):
    self.total, self.stream, self.every_s = total, stream or sys.stderr, every_s
    self.start = self.last = time.time()
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

  def __call__(self, done: int) -> None:
    now = time.time()
    if done < self.total and now - self.last < self.every_s:
      return
    self.last = now
    elapsed = max(now - self.start, 1e-9)
    rate = done / elapsed
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    line = (
      f"[predict] {done}/{self.total} images  {rate:.2f} images/s  "
      f"elapsed {elapsed:.0f} s  ETA {eta:.0f} s"
    )
    end = "\n" if (done >= self.total or not self.tty) else ""
    print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


def predict_files(
  predictor: Predictor,
  paths: Sequence[str],
  output_dir: str,
  score_thresh: float = 0.5,
  resize: bool = True,
  draw_images: bool = True,
) -> list[dict]:
  """Runs the predictor over image files; writes OUTPUT/results.json (COCO results),
  OUTPUT/images.json (id, file_name, height, width) and OUTPUT/NAME.png per image.

  Detections scoring below score_thresh are left out of both. Returns the COCO results.
  """
  os.makedirs(output_dir, exist_ok=True)
  ids = image_ids(paths)
  results, images = [], []
  progress = Progress(len(paths))
  for done, (path, image_id) in enumerate(zip(paths, ids), 1):
    image = read_image(path)
    [res] = predictor([image], resize=resize)
    keep = res["scores"] >= score_thresh
    res = {
      k: (np.asarray(v)[keep] if k != "names" else [n for n, o in zip(v, keep) if o])
      for k, v in res.items()
    }
    results.extend(to_coco(res, image_id, predictor.meta.get("category_ids")))
    images.append(
      {
        "id": image_id,
        "file_name": os.path.basename(path),
        "height": image.shape[0],
        "width": image.shape[1],
      }
    )
    if draw_images:
      png = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
      visualize.draw(image, res).save(png + ".tmp", format="PNG")
      os.replace(png + ".tmp", png)
    progress(done)
  files.write_json(os.path.join(output_dir, "results.json"), results)
  files.write_json(os.path.join(output_dir, "images.json"), images, indent=1)
  return results


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m rethink_jax.predict",
    description="Mask R-CNN predictions on images: COCO results JSON and one PNG per image.",
  )
  parser.add_argument("--checkpoint", required=True, help="detector directory or training workdir")
  parser.add_argument("--input", required=True, help="an image file or a directory of images")
  parser.add_argument("--output", required=True, help="directory for results.json and the PNGs")
  parser.add_argument("--score-thresh", type=float, default=0.5, help="drop detections below it")
  parser.add_argument("--no-resize", action="store_true", help="images at their own size")
  parser.add_argument("--padding", choices=PADDINGS, default="bucket", help="canvas rule")
  parser.add_argument("--no-draw", action="store_true", help="write no PNGs")
  parser.add_argument("--tta", action="store_true", help="test-time augmentation (module doc)")
  parser.add_argument(
    "--tta-min-sizes", help="comma-separated shorter sides of the TTA views (400,500,...,1200)"
  )
  parser.add_argument("--tta-max-size", type=int, help="TTA views' longer side at most (4000)")
  parser.add_argument("--no-tta-flip", action="store_true", help="no mirrored TTA views")
  args = parser.parse_args(argv)
  tta = None
  if args.tta:  # fields not given take tta.default_tta_config's (Detectron2's TEST.AUG)
    tta = {"flip": not args.no_tta_flip}
    if args.tta_min_sizes is not None:
      try:
        tta["min_sizes"] = tuple(int(v) for v in args.tta_min_sizes.split(",") if v.strip())
      except ValueError:
        parser.error(f"--tta-min-sizes takes integers separated by commas: {args.tta_min_sizes}")
    if args.tta_max_size is not None:
      tta["max_size"] = args.tta_max_size

  from rethink_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure()
  paths = list_images(args.input)
  if not paths:
    parser.error(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {args.input}")
  predictor = Predictor.from_checkpoint(args.checkpoint, padding=args.padding, tta=tta)
  t0 = time.time()
  results = predict_files(
    predictor,
    paths,
    args.output,
    score_thresh=args.score_thresh,
    resize=not args.no_resize,
    draw_images=not args.no_draw,
  )
  print(
    f"[predict] {len(results)} detections on {len(paths)} images in {time.time() - t0:.1f} s "
    f"({predictor.compilations} compilation(s)); wrote {os.path.abspath(args.output)}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
