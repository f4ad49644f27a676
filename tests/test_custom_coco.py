"""Own COCO-format data in two commands: build (the CLI), then configs/custom_coco.py:NAME.

A tiny COCO-format folder is drawn here (non-contiguous category ids listed out of order, a crowd
region, images without annotations, several image sizes), built with the documented command,
trained for a few steps of a tiny model through the recipe with the class count read from the
data, and evaluated (during training, and again from the checkpoint as --mode=eval does). The
class-count and not-built errors, the schedule in units of the data set's size, and the
comparison's unit on the same data are checked without compiling anything.
"""

import json
import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image
from PIL import ImageDraw
from pycocotools import mask as mask_utils
import pytest

from configs import tiny_shapes
from rethink_jax import optim
from rethink_jax.data import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "custom_coco.py")
CATEGORIES = [{"id": 11, "name": "kiwi"}, {"id": 2, "name": "cat"}, {"id": 7, "name": "dog"}]
NAMES_BY_ID = ("cat", "dog", "kiwi")  # contiguous labels follow increasing category id
IDS = (2, 7, 11)


def _draw_split(rng, root, split, num_images, first_id):
  """Writes images with drawn rectangles / ellipses and their COCO json.

  The last image has no annotation, the one before it also has a crowd region (RLE).
  Returns the number of images with a non-crowd instance.
  """
  img_dir = os.path.join(root, split)
  os.makedirs(img_dir)
  images, anns = [], []
  for k in range(num_images):
    image_id = first_id + 7 * k  # not contiguous either
    h, w = int(rng.integers(40, 65)), int(rng.integers(40, 65))
    img = Image.fromarray(rng.integers(0, 80, (h, w, 3), np.uint8))
    draw = ImageDraw.Draw(img)
    num_objects = 0 if k == num_images - 1 else int(rng.integers(1, 4))
    for _ in range(num_objects):
      bw, bh = int(rng.integers(8, w // 2)), int(rng.integers(8, h // 2))
      x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
      cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]["id"]
      color = tuple(int(v) for v in rng.integers(120, 256, 3))
      if rng.random() < 0.5:
        draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=color)
        poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
      else:
        draw.ellipse([x, y, x + bw - 1, y + bh - 1], fill=color)
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        cx, cy = x + bw / 2, y + bh / 2
        poly = np.stack([cx + bw / 2 * np.cos(t), cy + bh / 2 * np.sin(t)], 1).ravel().tolist()
      anns.append(
        {
          "id": 1000 * first_id + len(anns),
          "image_id": image_id,
          "category_id": cat,
          "iscrowd": 0,
          "area": float(bw * bh),
          "bbox": [float(x), float(y), float(bw), float(bh)],
          "segmentation": [[float(v) for v in poly]],
        }
      )
    if k == num_images - 2:  # a crowd region: uncompressed RLE, as in COCO
      crowd = np.zeros((h, w), np.uint8)
      crowd[h // 2 :, : w // 3] = 1
      rle = mask_utils.encode(np.asfortranarray(crowd))
      anns.append(
        {
          "id": 1000 * first_id + len(anns),
          "image_id": image_id,
          "category_id": IDS[0],
          "iscrowd": 1,
          "area": float(crowd.sum()),
          "bbox": [float(v) for v in mask_utils.toBbox(rle)],
          "segmentation": {"size": [h, w], "counts": _uncompressed(crowd)},
        }
      )
    name = f"{image_id}.{'png' if k % 2 else 'jpg'}"
    img.save(os.path.join(img_dir, name))
    images.append({"id": image_id, "file_name": name, "height": h, "width": w})
  with open(os.path.join(root, f"{split}.json"), "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": CATEGORIES}, f)
  return num_images - 1


def _uncompressed(mask):
  """Column-major run lengths starting with zeros (COCO's uncompressed RLE)."""
  flat = mask.ravel(order="F")
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds).tolist()
  return ([0] + runs) if flat[0] else runs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """coco_instances/mini built with the documented command: (data_dir, train images used)."""
  rng = np.random.default_rng()
  src = str(tmp_path_factory.mktemp("own_coco"))
  num_train = _draw_split(rng, src, "train", 6, first_id=3)
  _draw_split(rng, src, "val", 3, first_id=100)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  cmd = [
    sys.executable,
    "-m",
    "rethink_jax.data.build",
    f"--data_dir={data_dir}",
    "--name=coco_instances",
    "--config=mini",
    f"--split=train:{src}/train.json:{src}/train",
    f"--split=validation:{src}/val.json:{src}/val",
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "3 classes (cat, dog, kiwi; category ids [2, 7, 11])" in proc.stdout
  assert "python -m rethink_jax.main --config configs/custom_coco.py:mini" in proc.stdout
  return data_dir, num_train


def load_recipe(arg, *overrides):
  """The recipe as `python -m rethink_jax.main --config configs/custom_coco.py:ARG ...` sees it."""
  fv = flags.FlagValues()
  argv = ["main", f"--config={RECIPE}:{arg}", *overrides]
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv, lock_config=True)
  fv(argv)
  return fv.config


# ------------------------------------------------------------------------------------------------
# No compilation.
# ------------------------------------------------------------------------------------------------
def test_build_keeps_names_and_category_ids(built):
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  data_dir, num_train = built
  c = load_recipe("mini", f"--config.data.data_dir={data_dir}").data
  meta = pipeline.get_builder(c).info.metadata["categories"]
  assert [(m["id"], m["name"]) for m in meta] == list(zip(IDS, NAMES_BY_ID))
  assert pipeline.class_names(c) == list(NAMES_BY_ID) and pipeline.category_ids(c) == list(IDS)
  assert len(pipeline.train_pool(c)) == num_train  # the image without annotations is not trained
  gt = pipeline.get_coco_gt(c)
  assert len(gt.getImgIds()) == 3 and any(a["iscrowd"] for a in gt.anns.values())


def test_class_count_and_names_come_from_the_data(built):
  data_dir, num_train = built
  c = recipe.resolve_config(load_recipe("mini,2x", f"--config.data.data_dir={data_dir}"))
  assert c.model.num_classes == 3
  assert tuple(c.data.class_names) == NAMES_BY_ID and tuple(c.data.category_ids) == IDS
  # Images: shorter side and longer side set once, for training, evaluation and the predictor.
  c = load_recipe("mini", "--config.data.min_size=512", "--config.data.max_size=600")
  assert c.model.input.min_size_test == 512 and c.model.input.max_size_test == 600
  from rethink_jax.data import preprocess  # pylint: disable=g-import-not-at-top

  assert preprocess.padded_size(c.data) == (608, 608) and c.data.min_size_test == 0


def test_wrong_class_count_stops_before_training(built, tmp_path):
  from rethink_jax import train  # pylint: disable=g-import-not-at-top

  data_dir, _ = built
  c = load_recipe("mini", f"--config.data.data_dir={data_dir}", "--config.model.num_classes=5")
  with pytest.raises(recipe.NumClassesMismatchError) as e:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  msg = str(e.value)
  assert "num_classes=5" in msg and "3 classes" in msg and "cat, dog, kiwi" in msg
  assert "--config.model.num_classes=3" in msg and "coco_instances/mini" in msg
  assert not os.path.exists(tmp_path / "run")  # nothing written, nothing compiled


def test_data_set_not_built_stops_with_the_build_command(built, tmp_path):
  from rethink_jax import train  # pylint: disable=g-import-not-at-top

  data_dir, _ = built
  c = load_recipe("nope", f"--config.data.data_dir={data_dir}")
  with pytest.raises(recipe.DatasetNotBuiltError) as e:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  msg = str(e.value)
  assert "coco_instances/nope" in msg and data_dir in msg
  assert f"python -m rethink_jax.data.build --data_dir={data_dir} --name=coco_instances" in msg
  assert "--config=nope --split=train:" in msg
  c = load_recipe("mini", f"--config.data.data_dir={data_dir}", "--config.data.eval_split=test")
  with pytest.raises(recipe.DatasetNotBuiltError, match=r"no split 'test'.*'train', 'validation'"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_schedule_in_multiples_of_the_data_sets_size():
  epochs_1x = 90_000 * 16 / 117_266
  # On COCO's own size: the paper's numbers (and Detectron2's 9x at batch 64).
  sched = ml_schedule(multiple=1.0)
  assert _resolved(sched, 16, 117_266)[:2] == (90_000, (60_000, 80_000))
  assert _resolved(ml_schedule(multiple=3.0), 16, 117_266)[:2] == (270_000, (210_000, 250_000))
  assert _resolved(ml_schedule(multiple=9.0), 64, 117_266)[:2] == (202_500, (187_500, 197_500))
  rng = np.random.default_rng()
  for _ in range(20):
    n, batch = int(rng.integers(20, 20_000)), int(rng.choice([1, 2, 4, 8, 16, 64]))
    multiple = float(rng.choice([0.5, 1, 3, 6]))
    total, decays, eval_every = _resolved(ml_schedule(multiple=multiple), batch, n)
    iters = multiple * epochs_1x * n / batch  # the same epochs as on COCO
    assert total == max(1, round(iters)), (n, batch, multiple)
    last = [round(d * 16 / batch * n / 117_266) for d in (60_000, 20_000)]
    if multiple >= 2:  # x0.1 at the last 60k and 20k iterations, scaled to the data
      assert decays == tuple(max(1, total - d) for d in last)
    else:  # 1x proportions: 2/3 and 8/9
      assert decays == tuple(max(1, round(total * f)) for f in (2 / 3, 8 / 9))
    assert eval_every == max(1, round(epochs_1x * n / batch / 2))  # two per 1x
    # 2x: both rules give the same decays, up to rounding.
    total, decays, _ = _resolved(ml_schedule(multiple=2.0), batch, n)
    assert np.abs(np.subtract(decays, [round(total * 2 / 3), round(total * 8 / 9)])).max() <= 1
    epochs = float(rng.uniform(1, 50))
    assert _resolved(ml_schedule(epochs=epochs), batch, n)[0] == max(1, round(epochs * n / batch))


def ml_schedule(**fields):
  c = load_recipe("any")
  c.schedule.update(fields)
  return c


def _resolved(c, batch, n):
  s = recipe.data_schedule(c.schedule, c.optim, batch, n)
  return s["total_steps"], s["decay_steps"], s["eval_every"]


def test_recipe_schedule_and_init_pixels_resolved_on_the_data(built, tmp_path):
  data_dir, num_train = built
  c = recipe.resolve_config(
    load_recipe("mini,24ep", f"--config.data.data_dir={data_dir}", "--config.batch_size=2")
  )
  assert c.schedule.total_steps == round(24 * num_train / 2)
  assert 1 <= c.optim.warmup_steps <= c.schedule.total_steps // 4
  s = optim.resolve_schedule(c.schedule, c.optim, c.batch_size)
  assert s["total_steps"] == c.schedule.total_steps and s["base_lr"] == pytest.approx(0.0025)
  # A subset of the training set: the schedule follows its size.
  c = recipe.resolve_config(
    load_recipe(
      "mini,24ep",
      f"--config.data.data_dir={data_dir}",
      "--config.batch_size=2",
      "--config.data.num_train_images=2",
    )
  )
  assert c.schedule.total_steps == 24
  # init_from: the pixel format of the backbone's meta.json (here a stand-in directory).
  meta = {"input_format": "RGB", "pixel_mean": [1.0, 2.0, 3.0], "pixel_std": [4.0, 5.0, 6.0]}
  (tmp_path / "meta.json").write_text(json.dumps(meta))
  c = load_recipe("mini", f"--config.data.data_dir={data_dir}", f"--config.init_from={tmp_path}")
  c = recipe.resolve_config(c)
  assert c.data.input_format == c.model.input.format == "RGB"
  assert tuple(c.data.pixel_std) == tuple(c.model.input.pixel_std) == (4.0, 5.0, 6.0)


def test_compare_on_the_same_data(built):
  from rethink_jax import compare  # pylint: disable=g-import-not-at-top

  data_dir, num_train = built
  path = os.path.join(ROOT, "configs", "compare_coco.py")
  fv = flags.FlagValues()
  argv = [
    "compare",
    f"--config={path}",
    "--config.data.builder_config=mini",
    f"--config.data.data_dir={data_dir}",
  ]
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  fv(argv)
  assert fv.config.compare.unit_steps == 90_000  # COCO's, before the data is seen
  c = compare.scale_unit_to_data(fv.config)
  unit = c.compare.unit_steps
  expected = 90_000 * num_train / 117_266  # at batch 16
  assert unit % 2 == 0 and abs(unit - expected) <= 1 and c.eval_every == unit // 2
  longest = max(c.compare.multiples)  # both arms train to it
  assert longest == 6
  for arm in ("finetune", "scratch"):
    a = recipe.resolve_config(compare.arm_config(c, arm))
    assert a.model.num_classes == 3 and a.schedule.total_steps == longest * unit
    assert tuple(a.schedule.decay_steps) == compare.decay_steps(longest * unit, unit)
    assert a.eval_every == unit // 2


# ------------------------------------------------------------------------------------------------
# Training and evaluation through the recipe (a tiny model: the recipe's R-50 is the default).
# ------------------------------------------------------------------------------------------------
def test_train_and_evaluate_through_the_recipe(built, tmp_path):
  from rethink_jax import train  # pylint: disable=g-import-not-at-top

  data_dir, num_train = built
  c = load_recipe(
    "mini,2ep",
    f"--config.data.data_dir={data_dir}",
    "--config.batch_size=2",
    "--config.data.min_size=64",
    "--config.data.max_size=64",
    "--config.data.max_instances=16",
    "--config.data.mask_size=28",
    "--config.data.num_parallel_calls=1",
    "--config.eval.batch_size=4",
    "--config.checkpoint.async_save=False",
  )
  with c.unlocked():
    tiny = tiny_shapes.tiny_model()
    tiny.num_classes = 0  # read from the data, as the recipe does
    tiny.input = c.model.input
    c.model = tiny
  out = train.train_and_evaluate(c, str(tmp_path / "run"))
  steps = round(2 * num_train / 2)  # 2 epochs of the images with instances, 2 per step
  assert out["step"] == steps and out["train_step_compilations"] == 1
  assert all(np.isfinite(h["total_loss"]) for h in out["history"])
  assert 0.0 <= out["metrics"]["bbox/AP"] <= 100.0 and 0.0 <= out["metrics"]["segm/AP"] <= 100.0
  curve = train.read_curve(str(tmp_path / "run"))
  assert [p["step"] for p in curve] == [steps]
  with open(tmp_path / "run" / "config.json") as f:
    saved = json.load(f)
  assert saved["model"]["num_classes"] == 3
  assert tuple(saved["data"]["class_names"]) == NAMES_BY_ID
  assert tuple(saved["data"]["category_ids"]) == IDS
  # `python -m rethink_jax.main ... --mode=eval`: the checkpoint, evaluated again.
  record = train.evaluate_only(c, str(tmp_path / "run"))
  assert record["step"] == steps
  for key in ("bbox/AP", "segm/AP", "bbox/AP50", "segm/AP50"):
    assert record[key] == pytest.approx(curve[-1][key], abs=1e-6), key
