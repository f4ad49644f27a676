"""train_and_evaluate under faults, on the tiny config (one process, one CPU device):

* a damaged newest checkpoint: the run resumes from the newest one that restores and trains
  the same steps again with the same losses; with none usable it stops naming the directory,
  and starts over only when config.checkpoint.restart_if_unreadable is set;
* an unwritable workdir fails before training; a checkpoint write that fails (a simulated full
  disk) stops training with the step named and the earlier checkpoints intact;
* a training image that does not decode: the run stops at the step whose batch holds it,
  naming the record and its image id; with data.skip_bad_records it resumes, skips it and
  counts it in the logged metrics;
* SIGKILL at random moments, twice while an asynchronous checkpoint is being committed, five
  times in a row: every restart resumes from the newest complete checkpoint, and the finished
  run has the uninterrupted run's final parameters (1e-6) and each evaluation once in
  eval_curve.json.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from rethink_jax import checkpoints
from rethink_jax import train
from tests import tiny
from tests.test_preemption import _final_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, steps, **overrides):
  """tests/tiny.py's run (the same compiled step), checkpoints every 2 steps."""
  return tiny.train_config(
    data_dir, steps, **{"checkpoint.every_steps": 2, "checkpoint.keep": 3, **overrides}
  )


def _losses(history):
  return {h["step"]: h["total_loss"] for h in history}


def _truncate_largest_array(step_dir):
  paths = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if "/d/" in r + "/"]
  path = max(paths, key=os.path.getsize)
  os.truncate(path, os.path.getsize(path) // 2)


# orbax leaves the reads of a truncated checkpoint's other arrays unawaited.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.slow
def test_damaged_checkpoints_fall_back_or_stop(shapes_dir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  first = train.train_and_evaluate(tiny_config(shapes_dir, 4), workdir)
  expected = _losses(first["history"])
  assert sorted(checkpoints.step_dirs(ckpt_dir)) == [2, 4]

  # A truncated array file in step 4: resume from step 2, steps 3-4 again, the same losses.
  _truncate_largest_array(os.path.join(ckpt_dir, "4"))
  capsys.readouterr()
  again = train.train_and_evaluate(tiny_config(shapes_dir, 4), workdir)
  printed = capsys.readouterr().out
  assert f"checkpoint {ckpt_dir}/4 is not usable, skipped" in printed, printed
  assert f"resumed from {ckpt_dir} at step 2" in printed, printed
  resumed = _losses(again["history"])
  assert sorted(resumed) == [3, 4]
  for s in (3, 4):
    np.testing.assert_allclose(resumed[s], expected[s], rtol=1e-6, err_msg=f"step {s}")
  assert sorted(checkpoints.step_dirs(ckpt_dir)) == [2, 4]  # step 4 written again
  assert os.listdir(ckpt_dir + checkpoints.UNUSABLE_SUFFIX) == ["4"]

  # Nothing usable (unreadable metadata, a missing commit marker): an error naming the
  # directory, nothing changed; then, asked to, the run starts over from step 0.
  with open(os.path.join(ckpt_dir, "4", "default", "_METADATA"), "w") as f:
    f.write("{")
  os.remove(os.path.join(ckpt_dir, "2", checkpoints.COMMIT_MARKER))
  with pytest.raises(checkpoints.CheckpointError, match=f"no usable checkpoint in {ckpt_dir}"):
    train.train_and_evaluate(tiny_config(shapes_dir, 4), workdir)
  assert sorted(checkpoints.step_dirs(ckpt_dir)) == [2, 4]
  over = train.train_and_evaluate(
    tiny_config(shapes_dir, 4, **{"checkpoint.restart_if_unreadable": True}), workdir
  )
  restarted = _losses(over["history"])
  assert sorted(restarted) == [1, 2, 3, 4]
  for s in expected:
    np.testing.assert_allclose(restarted[s], expected[s], rtol=1e-6, err_msg=f"step {s}")


@pytest.mark.slow
def test_storage_faults_stop_early_and_lose_nothing(shapes_dir, tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  blocker = tmp_path / "a_file"
  blocker.write_text("")
  t0 = time.time()
  with pytest.raises(checkpoints.CheckpointError, match="cannot write checkpoints"):
    train.train_and_evaluate(tiny_config(shapes_dir, 2), str(blocker / "run"))
  assert time.time() - t0 < 10  # before the data, the model or any compilation

  # The commit of step 4 fails (a full disk): training stops naming step 4, at step 6 at the
  # latest (its next save), and step 2 stays the newest complete checkpoint.
  real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if os.path.basename(str(self._final_path)) == "4":  # pylint: disable=protected-access
      raise OSError(errno.ENOSPC, "No space left on device (simulated)")
    return await real_finalize(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with pytest.raises(checkpoints.CheckpointError) as e:
    train.train_and_evaluate(tiny_config(shapes_dir, 8), workdir)
  msg = str(e.value)
  assert "checkpoint of step 4" in msg and "[2] are intact" in msg, msg
  assert sorted(s for s in checkpoints.step_dirs(ckpt_dir)) == [2]
  monkeypatch.undo()
  # The space is back: the same command resumes from step 2.
  out = train.train_and_evaluate(tiny_config(shapes_dir, 4), workdir)
  assert [h["step"] for h in out["history"]] == [3, 4]


def test_missing_evaluation_is_owed_after_an_interruption():
  c = tiny_config(None, 8, eval_every=4)
  c.eval.at_end = True
  assert train.missing_evaluation(c, [], 4, 8)  # killed after checkpoint 4, before its eval
  assert not train.missing_evaluation(c, [{"step": 4}], 4, 8)
  assert not train.missing_evaluation(c, [], 6, 8)  # no evaluation due at step 6
  assert not train.missing_evaluation(c, [], 0, 8)
  c.eval_every = 0
  assert train.missing_evaluation(c, [{"step": 4}], 8, 8)  # the final one
  c.eval.at_end = False
  assert not train.missing_evaluation(c, [], 8, 8)


@pytest.mark.slow
def test_sigterm_on_one_process_saves_and_resumes(shapes_dir, tmp_path, monkeypatch, capsys):
  """SIGTERM while the third batch is read: the run saves the step it is at and returns; the
  same call then finishes with the uninterrupted run's losses."""
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  full = _losses(
    train.train_and_evaluate(tiny_config(shapes_dir, 4), str(tmp_path / "full"))["history"]
  )
  real = stream.make_train_iterator

  def signalled(*args, start_step=0, **kwargs):
    for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step):
      if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # the watch's handler only sets a flag
      yield batch

  monkeypatch.setattr(stream, "make_train_iterator", signalled)
  workdir = str(tmp_path / "cut")
  handler = signal.getsignal(signal.SIGTERM)
  capsys.readouterr()
  cut = train.train_and_evaluate(
    tiny_config(shapes_dir, 4, **{"checkpoint.every_steps": 0}), workdir
  )
  stop = cut["step"]  # the batches are read one ahead: the signal comes during step 1, 2 or 3
  assert cut["preempted"] and 1 <= stop <= 3, cut
  assert f"every process stopped after step {stop}" in capsys.readouterr().out
  assert sorted(checkpoints.step_dirs(os.path.join(workdir, "checkpoints"))) == [stop]
  assert signal.getsignal(signal.SIGTERM) == handler  # the watch put the handler back
  monkeypatch.undo()
  rest = train.train_and_evaluate(tiny_config(shapes_dir, 4), workdir)
  assert not rest["preempted"] and rest["step"] == 4
  resumed = {**_losses(cut["history"]), **_losses(rest["history"])}
  assert sorted(resumed) == [1, 2, 3, 4]
  for s in full:
    np.testing.assert_allclose(resumed[s], full[s], rtol=1e-6, err_msg=f"step {s}")


@pytest.mark.slow
def test_stalled_data_is_reported_not_waited_on(shapes_dir, tmp_path, monkeypatch):
  from rethink_jax import trainer  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  real = stream.make_train_iterator

  def stalling(*args, start_step=0, **kwargs):
    for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step):
      if step == 2:
        time.sleep(20)  # a hung read (the test must not wait for it)
      yield batch

  monkeypatch.setattr(stream, "make_train_iterator", stalling)
  workdir = str(tmp_path / "stall")
  t0 = time.time()
  with pytest.raises(trainer.DataStallError, match="no batch for 3 s at step 2"):
    train.train_and_evaluate(tiny_config(shapes_dir, 4, data_timeout_s=3.0), workdir)
  assert time.time() - t0 < 60
  assert sorted(checkpoints.step_dirs(os.path.join(workdir, "checkpoints"))) == [2]


@pytest.mark.slow
def test_bad_record_stops_at_its_step_then_is_skipped_on_request(shapes_dir, tmp_path):
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top
  from tests.data.test_bad_records import corrupt_train_record  # pylint: disable=g-import-not-at-top

  # The image the batch of step 2 reads second gets truncated.
  c = tiny_config(shapes_dir, 4)
  it = stream.make_train_iterator(
    c.data, 2, seed=int(c.seed), start_step=2, process_index=0, process_count=1
  )
  image_id = int(next(it)["image_id"][1])
  meta = pipeline.records_meta(pipeline.get_builder(c.data), "train")
  (record,) = np.flatnonzero(meta["image_id"] == image_id)
  data_dir = str(tmp_path / "tfds")
  corrupt_train_record(shapes_dir, data_dir, int(record))

  workdir = str(tmp_path / "run")
  with pytest.raises(stream.BadRecordError) as err:
    train.train_and_evaluate(tiny_config(data_dir, 4), workdir)
  message = str(err.value)
  assert f"training record {record} of split 'train' (image id {image_id}," in message, message
  assert "for the batch of step 2: does not decode" in message, message
  assert sorted(checkpoints.step_dirs(os.path.join(workdir, "checkpoints"))) == [2]

  # The same command with skip_bad_records resumes at step 2 and skips that record once.
  out = train.train_and_evaluate(
    tiny_config(data_dir, 4, **{"data.skip_bad_records": True}), workdir
  )
  assert out["step"] == 4
  assert [(h["step"], h["data/skipped_records"]) for h in out["history"]] == [(3, 1), (4, 1)]
  assert all(np.isfinite(h["total_loss"]) for h in out["history"])


# ------------------------------------------------------------------------------------------------
# SIGKILL at random moments.
# ------------------------------------------------------------------------------------------------
KILL_STEPS = 8
_KILL_WORKER = textwrap.dedent(r"""
  import json, os, sys, time
  spec = json.loads(sys.argv[1])
  sys.path.insert(0, spec["root"])
  from orbax.checkpoint._src.path import atomicity
  from rethink_jax.data import stream
  from rethink_jax import train
  from tests.test_train_faults import kill_config

  real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
  async def slow_finalize(self, *args, **kwargs):  # widens a step's commit for the kills to hit
    name = os.path.basename(str(self._final_path))
    if name.isdigit():
      with open(spec["progress"], "a") as f:
        f.write(f"commit {name}\n")
      time.sleep(3.0)
    return await real_finalize(self, *args, **kwargs)
  atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize

  real = stream.make_train_iterator
  def slowed(*args, start_step=0, **kwargs):
    for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step):
      time.sleep(0.3)
      with open(spec["progress"], "a") as f:
        f.write(f"step {step}\n")
      yield batch
  stream.make_train_iterator = slowed
  train.train_and_evaluate(kill_config(spec["data_dir"]), spec["workdir"])
""")


def kill_config(data_dir):
  """8 steps, a checkpoint every 2, an evaluation (of 4 images) every 4."""
  return tiny_config(data_dir, KILL_STEPS, eval_every=4, **{"eval.num_images": 4})


def _progress(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [line.split() for line in f if line.strip()]


def _committed(ckpt_dir):
  return sorted(s for s in checkpoints.step_dirs(ckpt_dir) if checkpoints.is_committed(ckpt_dir, s))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_finish(shapes_dir, tmp_path):
  seed = random.randrange(2**31)
  rng = random.Random(seed)
  workdir = str(tmp_path / "killed")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  script = tmp_path / "worker.py"
  script.write_text(_KILL_WORKER)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  modes = ["commit", "random", "commit", "random", "random"]
  events = []
  for i, mode in enumerate(modes + ["finish"]):
    before = _committed(ckpt_dir)
    progress = str(tmp_path / f"run{i}.progress")
    log = open(tmp_path / f"run{i}.log", "w+")
    spec = dict(root=ROOT, data_dir=shapes_dir, workdir=workdir, progress=progress)
    proc = subprocess.Popen(
      [sys.executable, str(script), json.dumps(spec)],
      cwd=ROOT,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    try:
      deadline = time.time() + 300
      while proc.poll() is None and time.time() < deadline and mode != "finish":
        if mode == "commit" and any(kind == "commit" for kind, _ in _progress(progress)):
          time.sleep(rng.uniform(0.0, 1.0))  # inside the 3 s commit of a new step
          break
        if mode == "random" and _committed(ckpt_dir) != before:  # once it made progress
          time.sleep(rng.uniform(0.0, 2.5))
          break
        time.sleep(0.1)
      if mode != "finish" and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started
      rc = proc.wait(timeout=300)
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    log.seek(0)
    text = log.read()
    log.close()
    lines = _progress(progress)
    in_commit = [int(n) for kind, n in lines if kind == "commit"][-1:] if mode == "commit" else []
    events.append((mode, rc, lines[-1] if lines else None, _committed(ckpt_dir), in_commit))
    where = f"seed {seed}, run {i} ({mode}): {events}\n{text[-3000:]}"
    # Each start resumed from the newest complete checkpoint of the previous run.
    if before:
      assert f"resumed from {ckpt_dir} at step {before[-1]}" in text, where
    elif lines:
      assert "resumed from" not in text, where
    # Only complete checkpoints are steps; every one of them restores (checked at the end).
    assert all(checkpoints.is_committed(ckpt_dir, s) for s in checkpoints.step_dirs(ckpt_dir))
    # A step killed in its commit is not a checkpoint (its temporary directory is not a step).
    assert not set(in_commit) & set(_committed(ckpt_dir)), where
    if mode == "finish":
      assert rc == 0, where
    else:
      assert rc in (-signal.SIGKILL, 0), where
  print("kills:", events)
  assert sum(1 for e in events if e[0] == "commit" and e[1] == -signal.SIGKILL and e[4]) == 2
  assert len({tuple(e[3]) for e in events}) >= 3, events  # restarts resumed from later steps

  reference = str(tmp_path / "reference")
  train.train_and_evaluate(kill_config(shapes_dir), reference)
  want, got = _final_params(reference, KILL_STEPS), _final_params(workdir, KILL_STEPS)
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-6, err_msg=f"seed {seed}: {k}")
  curve, ref_curve = train.read_curve(workdir), train.read_curve(reference)
  assert [p["step"] for p in curve] == [p["step"] for p in ref_curve] == [4, 8], curve
  for p, q in zip(curve, ref_curve):
    for k in ("bbox/AP", "segm/AP", "images_seen"):
      assert p[k] == pytest.approx(q[k], abs=1e-6), (seed, k, p, q)
