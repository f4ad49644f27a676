"""Checkpoint faults (rethink_jax/checkpoints.py) on a small train-state-like tree, no model:
damaged newest steps (truncated array file, missing commit marker, unreadable metadata) fall back
to the newest step that restores; no usable step stops with an error naming the directory unless
starting over is asked for; an unwritable directory fails at once; a failed asynchronous write is
reported with its step, keeps the earlier checkpoints and stops the caller."""

import errno
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rethink_jax import checkpoints


def _state(step, rng):
  return {
    "step": jnp.asarray(step, jnp.int32),
    "params": {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)},
    "opt_state": {"mu": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)},
  }


def _target(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state
  )


def _write(ckpt_dir, steps, rng, *, async_save=True):
  """Saves one fresh random state per step; returns {step: host state}."""
  saver = checkpoints.Saver(
    checkpoints.make_manager(ckpt_dir, keep=5, async_save=async_save), ckpt_dir
  )
  saved = {}
  for step in steps:
    state = _state(step, rng)
    saved[step] = jax.device_get(state)
    saver.save(step, state)
  assert saver.finish() == steps[-1]
  saver.close()
  return saved


def _largest_array_file(step_dir):
  paths = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if "/d/" in r + "/"]
  return max(paths, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _drop_commit_marker(step_dir):
  os.remove(os.path.join(step_dir, checkpoints.COMMIT_MARKER))


def _garble_metadata(step_dir):
  with open(os.path.join(step_dir, checkpoints.ITEM, "_METADATA"), "w") as f:
    f.write('{"tree_metadata": ')


DAMAGES = {
  "truncated array file": (_truncate, "OUT_OF_RANGE"),
  "missing commit marker": (_drop_commit_marker, "no commit marker"),
  "unreadable metadata": (_garble_metadata, "JSONDecodeError"),
}


def _assert_tree_equal(got, want):
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(jax.device_get(got)), jax.tree_util.tree_leaves(want)
  ):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


# orbax leaves the reads of a truncated checkpoint's other arrays unawaited.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_falls_back_to_newest_that_restores(tmp_path, damage):
  rng = np.random.default_rng()
  ckpt_dir = str(tmp_path / "checkpoints")
  saved = _write(ckpt_dir, [2, 4, 6], rng)
  damage_fn, reason = DAMAGES[damage]
  damage_fn(os.path.join(ckpt_dir, "6"))
  logged = []
  state, step = checkpoints.restore_latest(ckpt_dir, _target(saved[6]), log=logged.append)
  assert step == 4
  _assert_tree_equal(state, saved[4])
  # The skipped step is named with its reason, and moved aside so that step 6 is written again.
  assert len(logged) == 1 and f"{ckpt_dir}/6 is not usable" in logged[0], logged
  assert reason in logged[0], logged
  assert sorted(checkpoints.step_dirs(ckpt_dir)) == [2, 4]
  assert os.listdir(ckpt_dir + checkpoints.UNUSABLE_SUFFIX) == ["6"]
  # Training on from step 4 writes step 6 again (the manager does not see the damaged one).
  again = _write(ckpt_dir, [6], rng)
  state, step = checkpoints.restore_latest(ckpt_dir, _target(saved[6]), log=logged.append)
  assert step == 6 and len(logged) == 1
  _assert_tree_equal(state, again[6])


# orbax leaves the reads of a truncated checkpoint's other arrays unawaited.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_usable_checkpoint_stops_unless_asked_to_start_over(tmp_path):
  rng = np.random.default_rng()
  ckpt_dir = str(tmp_path / "checkpoints")
  saved = _write(ckpt_dir, [1, 2, 3], rng)
  _truncate(os.path.join(ckpt_dir, "3"))
  _drop_commit_marker(os.path.join(ckpt_dir, "2"))
  _garble_metadata(os.path.join(ckpt_dir, "1"))
  logged = []
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.restore_latest(ckpt_dir, _target(saved[3]), log=logged.append)
  msg = str(e.value)
  assert f"no usable checkpoint in {ckpt_dir}" in msg and "restart_if_unreadable" in msg, msg
  assert all(f"step {s}" in msg for s in (1, 2, 3)), msg
  assert len(logged) == 3
  assert sorted(checkpoints.step_dirs(ckpt_dir)) == [1, 2, 3]  # nothing touched
  state, step = checkpoints.restore_latest(
    ckpt_dir, _target(saved[3]), restart_if_unreadable=True, log=logged.append
  )
  assert state is None and step is None
  assert "starting over" in logged[-1]
  assert not checkpoints.step_dirs(ckpt_dir)
  assert sorted(os.listdir(ckpt_dir + checkpoints.UNUSABLE_SUFFIX)) == ["1", "2", "3"]
  # An empty directory is a fresh start, not an error.
  assert checkpoints.restore_latest(str(tmp_path / "none"), _target(saved[3])) == (None, None)


def test_interrupted_write_is_not_a_checkpoint(tmp_path):
  """orbax's temporary directory of a write that was killed is never taken for a step."""
  rng = np.random.default_rng()
  ckpt_dir = str(tmp_path / "checkpoints")
  saved = _write(ckpt_dir, [2, 4], rng)
  os.rename(os.path.join(ckpt_dir, "4"), os.path.join(ckpt_dir, "4.orbax-checkpoint-tmp-123"))
  assert sorted(checkpoints.step_dirs(ckpt_dir)) == [2]
  state, step = checkpoints.restore_latest(ckpt_dir, _target(saved[4]))
  assert step == 2
  _assert_tree_equal(state, saved[2])


def test_unwritable_directory_fails_before_anything(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(checkpoints.CheckpointError, match="cannot write checkpoints to .*a_file"):
    checkpoints.check_writable(str(blocker / "run" / "checkpoints"))
  if os.geteuid() != 0:  # root writes anywhere
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(checkpoints.CheckpointError, match="cannot write checkpoints"):
      checkpoints.check_writable(str(ro / "checkpoints"))
  checkpoints.check_writable(str(tmp_path / "fine" / "checkpoints"))
  assert os.listdir(tmp_path / "fine" / "checkpoints") == []


@pytest.mark.parametrize("async_save", [True, False])
def test_failed_write_names_the_step_and_keeps_earlier_checkpoints(
  tmp_path, monkeypatch, async_save
):
  """The disk fills up while step 3 is committed: the error names step 3, steps 1-2 restore."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng()
  ckpt_dir = str(tmp_path / "checkpoints")
  real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if os.path.basename(str(self._final_path)) == "3":  # pylint: disable=protected-access
      raise OSError(errno.ENOSPC, "No space left on device (simulated)")
    return await real_finalize(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  saver = checkpoints.Saver(
    checkpoints.make_manager(ckpt_dir, keep=2, async_save=async_save), ckpt_dir
  )
  saved = {}
  with pytest.raises(checkpoints.CheckpointError) as e:
    for step in (1, 2, 3, 4):  # the caller's loop stops at the error
      state = _state(step, rng)
      saved[step] = jax.device_get(state)
      saver.save(step, state)
    saver.finish()
  msg = str(e.value)
  assert "checkpoint of step 3" in msg and "[1, 2] are intact" in msg, msg
  assert 4 not in checkpoints.step_dirs(ckpt_dir)  # training stopped before writing step 4
  saver.mngr.close()
  monkeypatch.undo()
  state, step = checkpoints.restore_latest(ckpt_dir, _target(saved[2]))
  assert step == 2
  _assert_tree_equal(state, saved[2])
  _assert_tree_equal(
    checkpoints.restore_latest(ckpt_dir, _target(saved[1]))[0], saved[2]
  )  # still the newest
