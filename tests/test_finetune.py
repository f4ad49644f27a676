"""Fine-tuning and evaluating a whole detector on the tiny config: init_from_detector (same and
another class count, mismatches named) and the evaluation-only mode of rethink_jax.main.

One short training run (a module fixture) is saved as a detector checkpoint; every other test
reuses its compiled model (train.build_parts is memoized) and the persistent XLA cache.
"""

import copy
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rethink_jax import detector_checkpoint
from rethink_jax import files
from rethink_jax import optim
from rethink_jax import train
from rethink_jax import trainer
from rethink_jax import warm_start
from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
HEAD_KEYS = sorted(
  f"params/{h}/{leaf}" for h in warm_start.CLASS_HEADS for leaf in ("kernel", "bias")
)


def tiny_config(data_dir, **overrides):
  """tests/tiny.py's run of STEPS iterations (test_train.py's step), evaluated at the end."""
  return tiny.train_config(
    data_dir, STEPS, **{"eval.at_end": True, "eval.num_images": 4, **overrides}
  )


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _state_variables(state):
  """{"collection/path": array} of a train state's model variables."""
  out = {}
  for coll, tree in trainer.variables_of(state).items():
    out.update({f"{coll}/{k}": np.asarray(v) for k, v in _flat(tree).items()})
  return out


# ------------------------------------------------------------------------------------------------
# Fixtures: the data, one training run and its detector checkpoint.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictions():
  """Every COCO evaluation of this module records its model outputs here, one list per call
  (a few steps of training give AP 0: equal outputs are what shows the same weights)."""
  from rethink_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top

  real, calls = evaluate_lib.evaluate, []

  def recording(predict, batches, *args, **kwargs):
    outputs = []
    calls.append(outputs)

    def predict_and_record(batch):
      out = predict(batch)
      outputs.append({k: np.array(v) for k, v in out.items()})
      return out

    return real(predict_and_record, batches, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluate_lib, "evaluate", recording)
    yield calls


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory, predictions):
  """A STEPS-step run with its final evaluation, and its last checkpoint saved as a detector."""
  c = tiny_config(shapes_dir)
  c.seed = int(np.random.SeedSequence().entropy % 2**31)  # fresh weights every run
  workdir = str(tmp_path_factory.mktemp("run"))
  out = train.train_and_evaluate(c, workdir)
  state = ocp.StandardCheckpointer().restore(
    os.path.join(workdir, "checkpoints", str(STEPS), "default")
  )
  variables = {"params": state["params"], **state["collections"]}
  model_config = copy.deepcopy(c.model)
  model_config.input.update(  # how the pipeline fed the images it was trained on
    format=c.data.input_format,
    pixel_mean=c.data.pixel_mean,
    pixel_std=c.data.pixel_std,
    min_size_test=c.data.min_size_test,
    max_size_test=c.data.max_size,
  )
  names = ["circle", "square", "triangle"]
  detector_dir = detector_checkpoint.save_detector(
    str(tmp_path_factory.mktemp("detector") / "tiny"),
    variables,
    model_config,
    {"source": "test", "sha256": None, "class_names": names},
  )
  expected = {}
  for coll, tree in variables.items():
    expected.update({f"{coll}/{k}": np.asarray(v) for k, v in _flat(tree).items()})
  assert len(predictions) == 1
  return dict(
    config=c,
    workdir=workdir,
    out=out,
    detector_dir=detector_dir,
    variables=expected,
    predictions=predictions[0],
  )


def _parts_and_sample(config):
  """build_parts of a config and the sample batch a run of it initialises with."""
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  batch = next(pipeline.make_eval_iterator(train.eval_data_config(config), 1, 0, 1))
  sample = train.init_batch(batch)
  sched = optim.resolve_schedule(config.schedule, config.optim, int(config.batch_size))
  return train.build_parts(config, sched, trainer.make_mesh(), sample), sample


# ------------------------------------------------------------------------------------------------
# init_from_detector.
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_other_num_classes_reinitialises_only_the_class_heads(trained, shapes_dir, capsys):
  c = tiny_config(shapes_dir, **{"model.num_classes": 5})
  c.init_from_detector = trained["detector_dir"]
  parts, sample = _parts_and_sample(c)
  rng = jax.random.PRNGKey(int(np.random.default_rng().integers(2**31)))
  fresh = _state_variables(parts.init(rng, sample))
  state = warm_start.initial_state(c, parts, rng, sample)
  printed = capsys.readouterr().out
  got, saved = _state_variables(state), trained["variables"]
  assert sorted(got) == sorted(saved)
  for key in HEAD_KEYS:  # the fresh init of the 5-class heads, listed in the log
    assert got[key].shape != saved[key].shape, key
    np.testing.assert_array_equal(got[key], fresh[key], err_msg=key)
    assert key in printed, (key, printed)
  assert "re-initialised (checkpoint 3 classes, recipe 5)" in printed, printed
  for key in sorted(set(saved) - set(HEAD_KEYS)):
    np.testing.assert_array_equal(got[key], saved[key], err_msg=key)
  assert not np.array_equal(
    fresh["params/roi_heads/box_head/fc1/kernel"], got["params/roi_heads/box_head/fc1/kernel"]
  )  # the loaded values are not the fresh init's


@pytest.mark.slow
def test_same_num_classes_loads_every_variable(trained, shapes_dir, tmp_path, capsys):
  c = tiny_config(shapes_dir, **{"init_from_detector": trained["detector_dir"]})
  parts, sample = _parts_and_sample(c)
  state = warm_start.initial_state(c, parts, jax.random.PRNGKey(1), sample)
  got, saved = _state_variables(state), trained["variables"]
  assert sorted(got) == sorted(saved)
  for key, value in saved.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  printed = capsys.readouterr().out
  assert f"loaded {len(saved)} arrays" in printed and "re-initialised" not in printed, printed

  # A run from the detector trains (the compiled step is reused); started again in the same
  # workdir it resumes and ignores init_from_detector (here a directory that does not exist).
  workdir = str(tmp_path / "finetune")
  out = train.train_and_evaluate(
    tiny_config(
      shapes_dir,
      **{
        "init_from_detector": trained["detector_dir"],
        "eval.at_end": False,
        "schedule.total_steps": 1,
      },
    ),
    workdir,
  )
  assert out["step"] == 1 and np.isfinite(out["history"][0]["total_loss"])
  assert f"init_from_detector {trained['detector_dir']}" in capsys.readouterr().out
  again = tiny_config(shapes_dir, **{"eval.at_end": False})
  again.init_from_detector = str(tmp_path / "absent")
  assert train.train_and_evaluate(again, workdir)["step"] == STEPS
  assert "resumed from" in capsys.readouterr().out


def test_mismatched_architecture_or_normalisation_is_named(trained, shapes_dir):
  c = tiny_config(shapes_dir, **{"init_from_detector": trained["detector_dir"]})
  _, model_config, _ = detector_checkpoint.load_detector(trained["detector_dir"])
  assert warm_start.check_detector_config(model_config, c) == []
  cases = {
    "model.backbone.depth: checkpoint 50, recipe 18": ("backbone.depth", 50),
    "model.box_head.name: checkpoint '2fc', recipe '4conv1fc'": ("box_head.name", "2fc"),
    "model.mask_head.norm: checkpoint 'FrozenBN', recipe 'GN'": ("mask_head.norm", "FrozenBN"),
    "model.anchors.aspect_ratios": ("anchors.aspect_ratios", (1.0,)),
    "--config.data.pixel_std='(1, 1, 1)'": ("input.pixel_std", (1.0, 1.0, 1.0)),
    "--config.data.input_format=RGB": ("input.format", "RGB"),
  }
  for expected, (field, value) in cases.items():
    bad = copy.deepcopy(model_config)
    bad.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError) as e:
      warm_start.check_detector_config(bad, c)
    assert expected in str(e.value), (expected, str(e.value))
  # BN and SyncBN hold the same variables; a test-time setting is a note, not an error.
  c.model.backbone.norm = "SyncBN"
  other = copy.deepcopy(model_config)
  other.backbone.norm = "BN"
  other.roi_heads.nms_thresh_test = 0.6
  other.input.min_size_test = 800
  notes = warm_start.check_detector_config(other, c)
  assert any("model.roi_heads.nms_thresh_test: checkpoint 0.6, recipe 0.5" in n for n in notes)
  assert any("model.input.min_size_test: checkpoint 800" in n for n in notes), notes


def test_missing_leftover_or_misshapen_variable_is_named(trained):
  saved = trained["variables"]
  tree = lambda flat: flax.traverse_util.unflatten_dict(
    {tuple(k.split("/")): v for k, v in flat.items()}
  )
  variables = tree(saved)
  collections = tree(saved)
  state = {"params": collections.pop("params"), "collections": collections}
  report = warm_start.load_detector_into(state, variables, reinit_class_heads=False)
  assert sorted(report["loaded"]) == sorted(saved) and not report["reinitialized"]

  rng = np.random.default_rng()
  keys = sorted(k for k in saved if k not in HEAD_KEYS)
  gone, reshaped = rng.choice(keys, 2, replace=False)
  cases = {
    f"{gone}: missing from the checkpoint (model {saved[gone].shape})": (
      {k: v for k, v in saved.items() if k != gone}
    ),
    "params/roi_heads/extra/kernel: not in the model (checkpoint (2, 3))": dict(
      saved, **{"params/roi_heads/extra/kernel": np.zeros((2, 3), np.float32)}
    ),
    f"{reshaped}: checkpoint {saved[reshaped].shape + (2,)} vs model {saved[reshaped].shape}": (
      dict(saved, **{reshaped: np.zeros(saved[reshaped].shape + (2,), np.float32)})
    ),
  }
  for expected, flat in cases.items():
    with pytest.raises(ValueError) as e:
      warm_start.load_detector_into(state, tree(flat), reinit_class_heads=True)
    assert expected in str(e.value), (expected, str(e.value))
  # Class heads of another shape are an error unless they are re-initialised.
  head = HEAD_KEYS[0]
  other = dict(saved, **{head: np.zeros(saved[head].shape[:-1] + (7,), np.float32)})
  with pytest.raises(ValueError, match=head):
    warm_start.load_detector_into(state, tree(other), reinit_class_heads=False)
  report = warm_start.load_detector_into(state, tree(other), reinit_class_heads=True)
  assert sorted(report["reinitialized"]) == HEAD_KEYS


# ------------------------------------------------------------------------------------------------
# The evaluation-only mode.
# ------------------------------------------------------------------------------------------------
def _coco_metrics(record):
  return {k: v for k, v in record.items() if k.startswith(("bbox/", "segm/"))}


def _assert_same_outputs(got, expected):
  assert len(got) == len(expected) > 0
  for i, (a, b) in enumerate(zip(got, expected)):
    assert sorted(a) == sorted(b)
    for key in b:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {i} {key}")


@pytest.mark.slow
def test_eval_mode_writes_the_training_runs_metrics(trained, shapes_dir, tmp_path, predictions):
  curve = train.read_curve(trained["workdir"])
  assert [p["step"] for p in curve] == [STEPS]
  expected = _coco_metrics(curve[-1])
  assert {"bbox/AP", "segm/AP", "bbox/AP50", "segm/AR100"} <= set(expected)
  reference = trained["predictions"]  # the training run's own evaluation
  assert sum(int(b["num_detections"].sum()) for b in reference) > 0
  assert np.ptp(np.concatenate([b["scores"].ravel() for b in reference])) > 0

  # The command line on the training workdir: its latest checkpoint.
  cmd = [
    sys.executable,
    "-m",
    "rethink_jax.main",
    f"--config={os.path.join(ROOT, 'configs', 'tiny_shapes.py')}:{STEPS}",
    f"--workdir={trained['workdir']}",
    "--mode=eval",
    f"--config.data.data_dir={shapes_dir}",
    "--config.data.num_parallel_calls=1",
    "--config.eval.num_images=4",
    "--config.schedule.decay_steps=(3,)",
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  path = os.path.join(trained["workdir"], train.EVAL_FILE)
  record = files.read_json(path)
  assert record["step"] == STEPS and record["checkpoint"].endswith(f"checkpoints/{STEPS}")
  assert _coco_metrics(record) == expected
  assert "bbox/AP" in proc.stdout and "segm/AP" in proc.stdout

  # In this process: the same checkpoint gives the same model outputs as the run's evaluation.
  os.remove(path)
  calls = len(predictions)
  record = train.evaluate_only(tiny_config(shapes_dir), trained["workdir"])
  assert files.read_json(path) == record and _coco_metrics(record) == expected
  _assert_same_outputs(predictions[calls], reference)

  # No checkpoint in the workdir: the detector checkpoint of the same weights.
  c = tiny_config(shapes_dir, **{"init_from_detector": trained["detector_dir"]})
  record = train.evaluate_only(c, str(tmp_path / "eval"))
  assert record["step"] is None and record["checkpoint"] == trained["detector_dir"]
  assert files.read_json(str(tmp_path / "eval" / train.EVAL_FILE)) == record
  assert _coco_metrics(record) == expected
  _assert_same_outputs(predictions[calls + 1], reference)

  # Nothing to evaluate, or heads that do not fit the recipe's classes: an error.
  with pytest.raises(ValueError, match="nothing to evaluate"):
    train.evaluate_only(tiny_config(shapes_dir), str(tmp_path / "empty"))
  c5 = tiny_config(shapes_dir, **{"model.num_classes": 5})
  c5.data.builder_overrides = {"num_categories": 5}  # data and recipe agree, the detector not
  c5.init_from_detector = trained["detector_dir"]
  with pytest.raises(ValueError, match="class heads do not fit"):
    train.evaluate_only(c5, str(tmp_path / "five"))


def test_cascade_stage_class_scores_are_class_heads():
  """Every cascade stage's cls_score keeps its fresh init; its class-agnostic deltas load."""
  rng = np.random.default_rng()
  shapes = {
    "roi_heads/box_predictor/0/cls_score/kernel": (8, 4),
    "roi_heads/box_predictor/2/cls_score/bias": (4,),
    "roi_heads/box_predictor/2/bbox_pred/kernel": (8, 4),
    "roi_heads/box_head/0/fc1/kernel": (6, 8),
  }
  fresh = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  ckpt = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  unflat = lambda d: flax.traverse_util.unflatten_dict(d, sep="/")
  out = warm_start.load_detector_into(
    {"params": unflat(fresh), "collections": {}}, {"params": unflat(ckpt)}, True
  )
  assert sorted(out["reinitialized"]) == [
    "params/roi_heads/box_predictor/0/cls_score/kernel",
    "params/roi_heads/box_predictor/2/cls_score/bias",
  ]
  got = _flat(out["state"]["params"])
  for key in shapes:
    want = fresh[key] if "cls_score" in key else ckpt[key]
    np.testing.assert_array_equal(np.asarray(got[key]), want)
