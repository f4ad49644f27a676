"""scripts/tpu_compile.py: ahead-of-time compilation of the train step for a TPU topology.

The compile test needs libtpu (requirements-tpu.txt, included by requirements-test.txt).
"""

import importlib.util
import os
import types

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tpu_compile():
  spec = importlib.util.spec_from_file_location(
    "tpu_compile", os.path.join(ROOT, "scripts", "tpu_compile.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_analysis_arithmetic(tpu_compile):
  gib = 2**30
  mem = types.SimpleNamespace(
    argument_size_in_bytes=3 * gib,
    output_size_in_bytes=3 * gib,
    alias_size_in_bytes=3 * gib,
    temp_size_in_bytes=10 * gib,
    generated_code_size_in_bytes=0,
  )
  compiled = types.SimpleNamespace(
    memory_analysis=lambda: mem, cost_analysis=lambda: {"flops": 197e12 * 0.5}
  )
  r = tpu_compile.analyse(compiled, tpu_compile.CHIPS["v5e"], images_per_chip=2)
  # Donated state: outputs alias the arguments, so the chip holds args + temps.
  assert r["total_gib"] == pytest.approx(13.0) and r["fits"]
  assert r["t_min_ms"] == pytest.approx(500.0) and r["max_img_s"] == pytest.approx(4.0)
  with pytest.raises(ValueError, match="unknown TPU generation"):
    tpu_compile.chip_of("v99:2x2")


def test_lowers_the_trainers_own_step(tpu_compile, tmp_path):
  """The abstract batch is the pipeline's batch, and the step lowered is train_and_evaluate's
  (the same build_parts object for the same config, batch shapes and devices)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax import optim  # pylint: disable=g-import-not-at-top
  from rethink_jax import train  # pylint: disable=g-import-not-at-top
  from rethink_jax import trainer  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  shapes.ShapesInstances(config="tiny", data_dir=str(tmp_path)).download_and_prepare()
  config = tpu_compile.load_config(os.path.join(ROOT, "configs", "tiny_shapes.py"))
  config.data.data_dir = str(tmp_path)
  config.data.num_parallel_calls = 1
  hw = tuple(config.data.pad_to)
  batch = next(stream.make_train_iterator(config.data, 2, seed=0))
  abstract = tpu_compile.abstract_batch(config, 2, hw)
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in abstract.items()} == {
    k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()
  }

  devices = jax.devices()[:1]
  lowered, parts = tpu_compile.lower_train_step(config, devices, 2, hw)
  sched = optim.resolve_schedule(config.schedule, config.optim, 2)
  assert (
    train.build_parts(config, sched, trainer.make_mesh(devices), train.init_batch(batch)) is parts
  )
  # Lowered with the trainer's shardings, the state donated.
  args = lowered.args_info[0]
  assert args[0]["params"] and all(a.donated for a in jax.tree_util.tree_leaves(args[0]))
  assert not any(a.donated for a in jax.tree_util.tree_leaves(args[1]))


def test_keypoint_model_batch_and_step(tpu_compile, keypoints_dir):
  """--keypoint: the abstract batch is the keypoint pipeline's (gt_keypoints (B, G, K, 3)) and
  the lowered step is the keypoint model's, taking gt_keypoints."""
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  config = tpu_compile.load_config(os.path.join(ROOT, "configs", "tiny_shapes.py"))
  tpu_compile.as_keypoint_model(config)
  config.data.update(name="shapes_keypoints", data_dir=keypoints_dir, num_parallel_calls=1)
  config.model.keypoint_head.update(
    num_keypoints=7, conv_dims=(16, 16), max_fg_rois=4, chunk_rois=2
  )
  hw = tuple(config.data.pad_to)
  batch = next(stream.make_train_iterator(config.data, 2, seed=0))
  abstract = tpu_compile.abstract_batch(config, 2, hw)
  assert abstract["gt_keypoints"].shape == (2, config.data.max_instances, 7, 3)
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in abstract.items()} == {
    k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()
  }
  lowered, parts = tpu_compile.lower_train_step(config, jax.devices()[:1], 2, hw)
  state, batch_info = lowered.args_info[0]
  assert "gt_keypoints" in batch_info
  params = jax.tree_util.tree_leaves_with_path(state["params"])
  names = {jax.tree_util.keystr(p) for p, _ in params}
  assert any("keypoint_head" in n for n in names) and not any("mask_head" in n for n in names)


@pytest.mark.slow
@pytest.mark.parametrize("roi_heads", ["standard", "cascade"])
def test_tiny_train_step_compiles_for_v5e(tpu_compile, roi_heads):
  assert tpu_compile.libtpu_available(), (
    "libtpu is missing: requirements-test.txt installs it (requirements-tpu.txt)"
  )
  # Compile-only use; other processes on the machine may hold libtpu's lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  devices = tpu_compile.topology_devices("v5e:2x2")
  assert len(devices) == 4 and devices[0].platform == "tpu", devices
  config = tpu_compile.load_config(os.path.join(ROOT, "configs", "tiny_shapes.py"))
  config.model.dtype = "bfloat16"
  config.model.roi_heads.name = roi_heads
  compiled, _, _ = tpu_compile.compile_train_step(config, devices, 2, (64, 64))
  r = tpu_compile.analyse(compiled, tpu_compile.CHIPS["v5e"], 2)
  print(r)
  assert 0 < r["args_gib"] <= r["total_gib"] < 16 and r["fits"], r
  assert r["gflops"] > 0 and r["max_img_s"] > 0, r
  # The step is sharded over the 4 chips: its input batch is split, the state replicated.
  shardings = compiled.input_shardings[0]
  state_sharding, batch_sharding = shardings
  assert batch_sharding["image"].spec[0] == "data"
  assert all(s.is_fully_replicated for s in jax.tree_util.tree_leaves(state_sharding["params"]))
  # Cascade R-CNN: one box head and predictor per stage.
  stages = sorted(state_sharding["params"]["roi_heads"]["box_predictor"])
  assert stages == (["0", "1", "2"] if roi_heads == "cascade" else ["bbox_pred", "cls_score"])
