r"""Mask R-CNN R-50-FPN-GN on your own COCO-format data set: build it once, then train.

  python -m rethink_jax.data.build --data_dir=$HOME/tensorflow_datasets --config=NAME \
      --split=train:/d/train.json:/d/train_images --split=validation:/d/val.json:/d/val_images
  python -m rethink_jax.main --config configs/custom_coco.py:NAME --workdir runs/NAME \
      --config.data.data_dir=$HOME/tensorflow_datasets

ARG: NAME[,SCHEDULE]. NAME is the built data set's config (coco_instances/NAME); SCHEDULE is the
paper's multiple of this data set's own size ("3x", the default; "0.5x") or epochs ("24ep").
The paper's 1x is 90k iterations at 16 images on COCO's 117,266 training images: 12.28 epochs.
On N training images at batch B, 1x is 12.28 * N / B iterations; the LR decays (x0.1 at the last
60k and 20k iterations of >= 2x, at 2/3 and 8/9 of shorter runs) and the evaluations (two per 1x:
the AP curve) scale with it (rethink_jax/data/recipe.py). --config.schedule.epochs=E or
--config.schedule.total_steps=T set the length directly.

Read from the data set when training starts: the class count (model.num_classes 0; any other
value must equal the data set's, else the run stops naming both), the class names and category
ids (written to WORKDIR/config.json). A data set that was not built stops with the build command.

Set once: the shorter side --config.data.min_size (800) and the longer side at most
--config.data.max_size (1333), for training and evaluation alike (images are padded to
max_size rounded up to 32). Small images and objects: lower both and the anchor sizes
(--config.model.anchors.sizes, 32..512 px on P2..P6).

From scratch by default (the paper's random-init recipe: GN everywhere, nothing frozen). Fine-tune
with --config.init_from=DIR, a backbone from `python -m rethink_jax.convert` (e.g. FAIR's
R-50-GN.pkl); the pixel format (channel order, mean, std) is then taken from DIR/meta.json.
Other depths: --config.model.backbone.depth=101 (with R-101 weights for init_from).
The LR is 0.02 at 16 images, scaled linearly with --config.batch_size.
"""

import ml_collections

from configs import common


def parse_arg(arg: str | None) -> tuple[str, dict]:
  """ "NAME[,SCHEDULE]" -> (NAME, {"multiple": m} or {"epochs": e})."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  if len(parts) > 2:
    raise ValueError(f"ARG must be NAME[,SCHEDULE], got {arg!r}")
  name = parts[0] if parts else "custom"
  schedule = parts[1].lower() if len(parts) > 1 else "3x"
  if schedule.endswith("ep"):
    out = {"epochs": float(schedule[:-2])}
  elif schedule.endswith("x"):
    out = {"multiple": float(schedule[:-1])}
  else:
    raise ValueError(f"SCHEDULE must be like '3x' or '24ep', got {schedule!r}")
  if next(iter(out.values())) <= 0:
    raise ValueError(f"SCHEDULE must be > 0, got {schedule!r}")
  return name, out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name, length = parse_arg(arg)
  c = common.coco_mask_rcnn(
    depth=50, norm="GN", pretrained=False, multiple=length.get("multiple", 1)
  )
  c.model.num_classes = 0  # the data set's class count
  c.require_init_from = False
  # With init_from: read pixels as the backbone was trained (its meta.json).
  c.pixels_from_init = True

  d = c.data
  d.builder_config = name
  min_size = ml_collections.FieldReference(800)
  max_size = ml_collections.FieldReference(1333)
  d.min_size = min_size
  d.min_size_test = 0  # = min_size
  d.max_size = max_size
  d.pad_to = ()  # = max_size rounded up to 32, square
  # One square shape that follows max_size; orientation buckets (common.coco_data's are for
  # 800 / 1333) can be given for the sizes chosen: --config.data.pad_buckets='((S, L), (L, S))'.
  d.pad_buckets = ()
  # How a trained model takes images (the predictor reads it from WORKDIR/config.json).
  m = c.model.input
  m.min_size_test = min_size
  m.max_size_test = max_size
  m.format = d.get_ref("input_format")
  m.pixel_mean = d.get_ref("pixel_mean")
  m.pixel_std = d.get_ref("pixel_std")

  c.schedule.scale_to_data = True
  c.schedule.epochs = length.get("epochs", 0.0)
  c.schedule.evals_per_1x = 2.0  # overrides eval_every; 0 = use eval_every
  c.reference = ml_collections.ConfigDict()
  return c
