"""The trainer end to end on the tiny config: one step + eval, COCO-format data, resume, the NaN
guard, init_from, and 8-device == 1-device (subprocess).

Compiling the whole Mask R-CNN takes a minute or two on 2 CPU cores, so every end-to-end test
here uses the same tiny model and data shapes, and a module-wide persistent compilation cache
makes every train_and_evaluate after the first reuse the compiled step.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
from PIL import Image
import pytest

from configs import tiny_shapes
from rethink_jax import train
from rethink_jax import warm_start
from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Fixtures.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent XLA cache for this module: identical steps compile once."""
  path = str(tmp_path_factory.mktemp("jax_cache"))
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  old = [getattr(jax.config, n) for n in names]
  for n, v in zip(names, (path, 0.0, -1)):
    jax.config.update(n, v)
  yield path
  for n, v in zip(names, old):
    jax.config.update(n, v)


def tiny_config(data_dir, steps, *, evaluate=False, **overrides):
  return tiny.train_config(data_dir, steps, **{"eval.at_end": evaluate, **overrides})


def _losses(history):
  return {h["step"]: h["total_loss"] for h in history}


# ------------------------------------------------------------------------------------------------
# Pure pieces (no compilation).
# ------------------------------------------------------------------------------------------------
def _meta(**kw):
  m = dict(
    depth=18,
    norm="GN",
    stride_in_1x1=False,
    width=8,
    input_format="BGR",
    pixel_mean=[103.53, 116.28, 123.675],
    pixel_std=[57.375, 57.12, 58.395],
    source="test",
    sha256=None,
  )
  m.update(kw)
  return m


def test_check_backbone_meta_names_the_fields_to_set():
  c = tiny_shapes.get_config()
  c.init_from = "/some/dir"
  warm_start.check_backbone_meta(_meta(), c)  # agrees: no error
  cases = {
    "config.model.backbone.norm='FrozenBN'": dict(norm="FrozenBN"),
    "config.model.backbone.stride_in_1x1=True": dict(stride_in_1x1=True),
    "config.model.backbone.width=64": dict(width=64),
    "config.data.input_format='RGB'": dict(input_format="RGB"),
    "config.data.pixel_std=(1.0, 1.0, 1.0)": dict(pixel_std=[1, 1, 1]),
    "config.model.backbone.depth=50": dict(depth=50),
    "config.model.backbone.groups=32": dict(groups=32, width_per_group=8),
    "config.model.backbone.width_per_group=8": dict(groups=1, width_per_group=8),
  }
  for expected, kw in cases.items():
    with pytest.raises(ValueError) as e:
      warm_start.check_backbone_meta(_meta(**kw), c)
    assert expected in str(e.value), (expected, str(e.value))
  # BN and SyncBN hold the same variables.
  c.model.backbone.norm = "SyncBN"
  warm_start.check_backbone_meta(_meta(norm="BN"), c)


def test_load_backbone_into_reports_and_refuses_mismatch():
  rng = np.random.default_rng()
  state = {
    "params": {
      "backbone": {
        "bottom_up": {
          "stem": {"conv1": {"kernel": np.zeros((7, 7, 3, 8), np.float32)}},
          "res2": {"0": {"conv1": {"kernel": np.zeros((3, 3, 8, 8), np.float32)}}},
        },
        "fpn_lateral2": {"kernel": np.zeros((1, 1, 8, 16), np.float32)},
      }
    },
    "collections": {
      "batch_stats": {
        "backbone": {"bottom_up": {"stem": {"conv1": {"norm": {"mean": np.zeros(8, np.float32)}}}}}
      }
    },
  }
  stem = rng.normal(size=(7, 7, 3, 8)).astype(np.float32)
  ckpt = {
    "params": {"stem": {"conv1": {"kernel": stem}}, "fc": {"kernel": np.ones((8, 10))}},
    "batch_stats": {"stem": {"conv1": {"norm": {"mean": np.full(8, 3.0)}}}},
  }
  r = warm_start.load_backbone_into(state, ckpt)
  assert r["loaded"] == ["batch_stats/stem/conv1/norm/mean", "params/stem/conv1/kernel"]
  assert r["missing"] == ["params/res2/0/conv1/kernel"]
  assert r["unexpected"] == ["params/fc/kernel"]
  np.testing.assert_array_equal(
    r["state"]["params"]["backbone"]["bottom_up"]["stem"]["conv1"]["kernel"], stem
  )
  np.testing.assert_array_equal(
    r["state"]["collections"]["batch_stats"]["backbone"]["bottom_up"]["stem"]["conv1"]["norm"][
      "mean"
    ],
    3.0,
  )
  assert r["state"]["params"]["backbone"]["fpn_lateral2"]["kernel"].shape == (1, 1, 8, 16)
  ckpt["params"]["stem"]["conv1"]["kernel"] = np.zeros((7, 7, 3, 16))
  with pytest.raises(ValueError, match=r"params/stem/conv1/kernel: checkpoint \(7, 7, 3, 16\)"):
    warm_start.load_backbone_into(state, ckpt)


# ------------------------------------------------------------------------------------------------
# End to end on the tiny config.
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_evaluate_resume_and_init_from(compile_cache, shapes_dir, tmp_path, capsys):
  """Two steps with evaluation and a checkpoint, from a backbone checkpoint (init_from); then a
  second call resumes, trains two more steps and extends the same AP curve."""
  del compile_cache
  from rethink_jax import convert  # pylint: disable=g-import-not-at-top
  from rethink_jax.models import resnet  # pylint: disable=g-import-not-at-top

  c = tiny_config(shapes_dir, 2, evaluate=True, **{"eval.num_images": 4})
  b = c.model.backbone
  net = resnet.build_resnet(depth=b.depth, norm=b.norm, num_groups=b.num_groups, width=b.width)
  variables = net.init(jax.random.PRNGKey(7), np.zeros((1, 64, 64, 3), np.float32))
  backbone_dir = convert.save_backbone(
    str(tmp_path / "backbone"),
    variables,
    _meta(pixel_mean=list(c.data.pixel_mean), pixel_std=list(c.data.pixel_std)),
  )
  c.init_from = backbone_dir
  workdir = str(tmp_path / "run")

  out = train.train_and_evaluate(c, workdir)
  printed = capsys.readouterr().out
  n = len(jax.tree_util.tree_leaves(variables["params"]))
  assert f"loaded {n} arrays; missing 0" in printed and "unexpected 0" in printed
  assert "parameters: " in printed and "trainable" in printed and "frozen" in printed
  assert out["step"] == 2 and out["train_step_compilations"] == 1
  assert [h["step"] for h in out["history"]] == [1, 2]
  for h in out["history"]:
    assert np.isfinite(h["total_loss"]) and h["total_loss"] > 0
    for key in (
      "loss_rpn_cls",
      "loss_rpn_loc",
      "loss_cls",
      "loss_box_reg",
      "loss_mask",
      "lr",
      "images_seen",
      "time/step_s",
      "time/data_wait_s",
    ):
      assert key in h, key
  assert out["history"][0]["lr"] == pytest.approx(0.02 / 3, rel=1e-5)  # warmup from 1/3
  assert out["history"][1]["images_seen"] == 4
  curve = train.read_curve(workdir)
  assert [p["step"] for p in curve] == [2] and curve[0]["images_seen"] == 4
  assert 0.0 <= curve[0]["bbox/AP"] <= 100.0 and 0.0 <= curve[0]["segm/AP"] <= 100.0
  assert out["metrics"]["bbox/AP"] == curve[0]["bbox/AP"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))

  # Resume in the same workdir with a longer schedule: starts at step 2, the curve grows.
  c2 = tiny_config(shapes_dir, 4, evaluate=True, **{"eval.num_images": 4})
  c2.init_from = backbone_dir  # ignored: the checkpoint wins
  out2 = train.train_and_evaluate(c2, workdir)
  assert "resumed from" in capsys.readouterr().out
  assert [h["step"] for h in out2["history"]] == [3, 4]
  assert [p["step"] for p in train.read_curve(workdir)] == [2, 4]
  assert [p["step"] for p in out2["curve"]] == [2, 4]


@pytest.mark.slow
def test_resume_is_exact(compile_cache, shapes_dir, tmp_path):
  """K steps, stop, resume == uninterrupted: per-step losses within 1e-6 (same data positions,
  rng, optimizer state)."""
  del compile_cache
  full = train.train_and_evaluate(tiny_config(shapes_dir, 4), str(tmp_path / "full"))
  part = str(tmp_path / "part")
  first = train.train_and_evaluate(tiny_config(shapes_dir, 2), part)
  second = train.train_and_evaluate(tiny_config(shapes_dir, 4), part)
  resumed = {**_losses(first["history"]), **_losses(second["history"])}
  expected = _losses(full["history"])
  assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4]
  for s in expected:
    np.testing.assert_allclose(resumed[s], expected[s], rtol=1e-6, err_msg=f"step {s}")
  # The learning rate also went through the warmup and the decay at step 3 identically.
  np.testing.assert_allclose(
    [h["lr"] for h in first["history"] + second["history"]],
    [h["lr"] for h in full["history"]],
    rtol=1e-7,
  )


@pytest.mark.slow
def test_nan_guard_stops_and_keeps_last_good_checkpoint(
  compile_cache, shapes_dir, tmp_path, monkeypatch
):
  """A batch with a NaN pixel at step 2: the run stops with the step and the batch's image ids,
  the checkpoint of step 2 (before it) is the last one, and nothing after it is written."""
  del compile_cache
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  real = stream.make_train_iterator
  bad_step, seen = 2, {}

  def poisoned(*args, start_step=0, **kwargs):
    for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step):
      if step == bad_step:
        batch = dict(batch, image=batch["image"].copy())
        batch["image"][0, 5, 5, 0] = np.nan
        seen["ids"] = batch["image_id"].tolist()
      yield batch

  monkeypatch.setattr(stream, "make_train_iterator", poisoned)
  workdir = str(tmp_path / "nan")
  c = tiny_config(shapes_dir, 4, **{"checkpoint.every_steps": 2})
  with pytest.raises(train.NonFiniteLossError) as e:
    train.train_and_evaluate(c, workdir)
  msg = str(e.value)
  assert f"train step {bad_step}" in msg and str(seen["ids"]) in msg, msg
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert "last good checkpoint" in msg


@pytest.mark.slow
def test_one_step_on_coco_format_data(compile_cache, tmp_path):
  """The COCO builder's records (a small COCO-format set written here) through the pipeline,
  one train step and the COCO evaluation against its ground truth JSON."""
  del compile_cache
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax.data import coco  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  rng = np.random.default_rng()
  root = tmp_path / "coco"
  (root / "images").mkdir(parents=True)
  images, anns = [], []
  for i in range(1, 5):
    h, w = 48 + 8 * i, 64
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(root / "images" / f"{i}.png")
    images.append({"id": 100 + i, "file_name": f"{i}.png", "height": h, "width": w})
    for k in range(2):
      x, y = float(rng.integers(0, 30)), float(rng.integers(0, 20))
      bw, bh = float(rng.integers(8, 30)), float(rng.integers(8, 25))
      anns.append(
        {
          "id": 1000 + 10 * i + k,
          "image_id": 100 + i,
          "category_id": [2, 5, 9][k + i % 2],
          "iscrowd": 0,
          "area": bw * bh,
          "bbox": [x, y, bw, bh],
          "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
        }
      )
  gt = {
    "images": images,
    "annotations": anns,
    "categories": [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}],
  }
  (root / "instances.json").write_text(json.dumps(gt))
  data_dir = str(tmp_path / "tfds")
  coco.build_coco_instances(
    data_dir,
    {s: (str(root / "instances.json"), str(root / "images")) for s in ("train", "validation")},
    name="tiny",
  )
  c = tiny_config(None, 1, evaluate=True)
  shapes_data = c.data
  c.data.update(name="coco_instances", builder_config="tiny")
  c.data.data_dir = data_dir
  assert c.data.pad_to == shapes_data.pad_to  # same shapes: the cached step is reused
  out = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert out["step"] == 1 and np.isfinite(out["history"][0]["total_loss"])
  assert 0.0 <= out["metrics"]["bbox/AP"] <= 100.0


# ------------------------------------------------------------------------------------------------
# 8 devices == 1 device (subprocess: the device count is fixed when jax starts).
# ------------------------------------------------------------------------------------------------
_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    import jax
    import numpy as np
    if sys.argv[2]:
      jax.config.update("jax_compilation_cache_dir", sys.argv[2])
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from configs import tiny_shapes
    from rethink_jax import optim, train, trainer
    assert jax.device_count() == 8, jax.devices()

    def make_batch(rng, b=8, size=64, g=16, s=28):
      batch = dict(
          image=rng.normal(size=(b, size, size, 3)).astype(np.float32),
          image_hw=np.full((b, 2), size, np.int32), orig_hw=np.full((b, 2), size, np.int32),
          image_id=np.arange(b, dtype=np.int32), scale=np.ones(b, np.float32),
          valid=np.ones(b, bool), gt_boxes=np.zeros((b, g, 4), np.float32),
          gt_classes=np.zeros((b, g), np.int32), gt_masks=np.zeros((b, g, s, s), np.uint8))
      yy, xx = np.mgrid[:s, :s]
      for i in range(b):
        for k in range(1 + i % 3):
          x1, y1 = rng.uniform(0, 40, 2)
          w, h = rng.uniform(8, 24, 2)
          batch["gt_boxes"][i, k] = [x1, y1, x1 + w, y1 + h]
          batch["gt_classes"][i, k] = rng.integers(1, 4)
          batch["gt_masks"][i, k] = ((yy - s / 2) ** 2 + (xx - s / 2) ** 2 < (s / 2.2) ** 2)
      return batch

    seed = int(np.random.SeedSequence().entropy % 2**31)
    batch = make_batch(np.random.default_rng(seed))
    report = {"seed": seed}
    for norm in ("GN", "SyncBN"):
      c = tiny_shapes.get_config("4")
      c.model = tiny_shapes.tiny_model(norm)
      sched = optim.resolve_schedule(c.schedule, c.optim, 8)
      rng = jax.random.PRNGKey(0)
      sample = train.init_batch(batch)
      # The trainer's parts on each mesh (train.build_parts: the step train_and_evaluate runs).
      parts = {n: train.build_parts(c, sched, trainer.make_mesh(jax.devices()[:n]), sample)
               for n in (1, 8)}
      # One initial state (host copy) for both meshes: init compiles once per model.
      initial = jax.device_get(parts[1].init(rng, sample))
      if norm == "SyncBN":
        # SyncBN's cross-device sums round differently from one device's, and random-init
        # objectness scores are nearly tied: the two meshes can then keep different proposals
        # (docs/performance.md, "8 devices == 1 device"). Zero RPN predictors make every
        # proposal its anchor with an exactly tied score (ties break by index), so the ROI heads
        # see the same ROIs; the GN run checks the RPN's own path.
        rpn_head = initial["params"]["proposal_generator"]["rpn_head"]
        for name in ("objectness_logits", "anchor_deltas"):
          rpn_head[name]["kernel"] = np.zeros_like(rpn_head[name]["kernel"])
        assert not rpn_head["objectness_logits"]["kernel"].any()
        assert not rpn_head["anchor_deltas"]["kernel"].any()
      out = {}
      for n in (1, 8):
        p = parts[n]
        state = jax.device_put(initial, p.state_sharding)  # fresh buffers: the step donates them
        before = initial
        new, metrics = p.train_step(state, trainer.to_global(batch, p.batch_sharding))
        out[n] = (before, jax.device_get(new), jax.device_get(metrics))
      (b1, s1, m1), (_, s8, m8) = out[1], out[8]
      losses = {k: (float(m1[k]), float(m8[k])) for k in m1 if k.startswith("loss_")}
      worst_loss = max(abs(a - b) / max(abs(a), 1e-12) for a, b in losses.values())
      # Parameters: each leaf's update on 8 devices against its update on 1, relative to the
      # step's largest parameter update. Not relative to the leaf's own update: a norm bias deep
      # in the backbone gets a gradient that is a sum of cancelling terms, so its tiny update
      # carries the float32 reduction-order noise of those terms (docs/performance.md).
      p1, p8, p0 = (jax.tree_util.tree_leaves_with_path(s["params"]) for s in (s1, s8, b1))
      update_max = max(float(np.abs(x1 - x0).max()) for (_, x1), (_, x0) in zip(p1, p0))
      worst_update, update_leaf = 0.0, ""
      for (path, x1), (_, x8), (_, x0) in zip(p1, p8, p0):
        err = float(np.abs((x1 - x0) - (x8 - x0)).max()) / max(update_max, 1e-12)
        if err > worst_update:
          worst_update, update_leaf = err, jax.tree_util.keystr(path)
      # Running statistics (SyncBN): a mean against the activation's scale, its running std (a
      # mean near 0 over large activations carries their rounding), a variance against itself.
      worst_stat, stat_leaf = 0.0, ""
      stats1 = dict((jax.tree_util.keystr(k), v)
                    for k, v in jax.tree_util.tree_leaves_with_path(s1["collections"]))
      stats8 = jax.tree_util.tree_leaves(s8["collections"])
      for (key, x1), x8 in zip(stats1.items(), stats8):
        scale = np.abs(x1)
        if key.endswith("['mean']"):
          scale = np.maximum(scale, np.sqrt(stats1[key[:-len("['mean']")] + "['var']"]))
        err = float(np.max(np.abs(x1 - x8) / np.maximum(scale, 1e-12)))
        if err > worst_stat:
          worst_stat, stat_leaf = err, key
      has_stats = "batch_stats" in s1["collections"]
      report[norm] = dict(losses=losses, worst_loss=worst_loss, worst_update=worst_update,
                          update_leaf=update_leaf, update_max=update_max, worst_stat=worst_stat,
                          stat_leaf=stat_leaf, batch_stats=has_stats)
    print("REPORT " + json.dumps(report))
""")


@pytest.mark.slow
def test_eight_devices_equal_one_device(compile_cache, tmp_path):
  script = tmp_path / "multi_device.py"
  script.write_text(_MULTI_DEVICE_SCRIPT)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, str(script), ROOT, compile_cache],
    env=env,
    capture_output=True,
    text=True,
    timeout=1500,
    check=False,
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
  report = json.loads(lines[0][len("REPORT ") :])
  for norm in ("GN", "SyncBN"):
    r = report[norm]
    msg = f"seed {report['seed']} {norm}: {r}"
    assert set(r["losses"]) >= {
      "loss_rpn_cls",
      "loss_rpn_loc",
      "loss_cls",
      "loss_box_reg",
      "loss_mask",
    }, msg
    assert r["worst_loss"] <= 1e-5, msg
    assert r["update_max"] > 1e-4, msg  # the step moved the parameters
    assert r["worst_update"] <= 1e-3, msg
    assert r["worst_stat"] <= 1e-4, msg
  assert report["SyncBN"]["batch_stats"] and not report["GN"]["batch_stats"]
