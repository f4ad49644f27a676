"""Train-state checkpoints that survive faults: damaged steps, failed writes, unwritable storage.

The train loop's checkpoints are orbax's (a CheckpointManager over workdir/checkpoints, one
directory per step, written asynchronously into a temporary directory that is renamed into place
when complete, with a commit marker `commit_success.txt` written last). On top of it:

  * `check_writable(ckpt_dir)`: every process writes and removes a probe file before training,
    so a read-only or missing workdir fails at start, not after hours of training;
  * `restore_latest(...)`: the newest step that restores, checked: it has its commit marker, its
    arrays and metadata read back, and its "step" equals its name. Damaged newer steps are logged
    (which and why) and moved aside to checkpoints_unusable/ so that the run writes those steps
    again; with checkpoints present but none usable it raises CheckpointError naming the
    directory, unless the caller allows starting over;
  * `Saver`: mngr.save with the step in every error, and after each write has finished (before
    the next save and at the end) a check that the step's commit marker exists: orbax logs a
    failed asynchronous write but carries on, and training must not run on without checkpoints.

Every process calls these functions at the same points (they hold barriers); the checkpoint
directory is shared storage as orbax requires, so every process sees the same files.
"""

from collections.abc import Callable
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import multihost

COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, just before the rename into place
ITEM = "default"  # the CheckpointManager's single item: DIR/<step>/default
UNUSABLE_SUFFIX = "_unusable"  # damaged steps go to <ckpt_dir>_unusable/<step>[.N]


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or none of the existing ones can be restored."""


def step_dirs(ckpt_dir: str) -> dict[int, str]:
  """{step: path} of ckpt_dir's step directories (complete or not; orbax's temporary
  directories, named "<step>.orbax-checkpoint-tmp-<time>", are not steps)."""
  if not os.path.isdir(ckpt_dir):
    return {}
  return {int(n): os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if n.isdigit()}


def is_committed(ckpt_dir: str, step: int) -> bool:
  return os.path.exists(os.path.join(ckpt_dir, str(step), COMMIT_MARKER))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost.sync_global_processes(name)


def check_writable(ckpt_dir: str) -> None:
  """Raises CheckpointError when this process cannot create files in ckpt_dir (made if missing)."""
  probe = os.path.join(ckpt_dir, f".write_probe_{jax.process_index()}")
  try:
    os.makedirs(ckpt_dir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("probe")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(
      f"cannot write checkpoints to {ckpt_dir} (process {jax.process_index()}): {e}. Training "
      f"did not start: give a writable --workdir (and free space for the checkpoints)."
    ) from e


def _short(e: BaseException) -> str:
  """The exception and its innermost cause, one line each (orbax wraps TensorStore's errors)."""
  root = e
  while root.__cause__ is not None or root.__context__ is not None:
    root = root.__cause__ or root.__context__
  parts = [e] if root is e else [e, root]
  lines = [(str(x).strip().splitlines() or [""])[0][:240] for x in parts]
  return " <- ".join(f"{type(x).__name__}: {line}" for x, line in zip(parts, lines))


def _restore_step(path: str, step: int, target: Any) -> Any:
  """The state in `path` (a step directory) laid out as `target`; raises on any damage."""
  if not os.path.exists(os.path.join(path, COMMIT_MARKER)):
    raise CheckpointError(
      f"no commit marker ({COMMIT_MARKER}): the write (or a copy) of this step did not finish"
    )
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(path, ITEM), target)
  saved_step = int(np.asarray(jax.device_get(state["step"])))
  if saved_step != step:
    raise CheckpointError(f"it holds step {saved_step}, not {step}")
  return state


def restore_latest(
  ckpt_dir: str,
  target: Any,
  *,
  restart_if_unreadable: bool = False,
  log: Callable[[str], None] = print,
) -> tuple[Optional[Any], Optional[int]]:
  """(state, step) of the newest usable checkpoint in ckpt_dir; (None, None) when it has none.

  target: the state's abstract tree (ShapeDtypeStructs with shardings) to restore into.
  Unusable newer steps are logged with the reason and moved to <ckpt_dir>_unusable/ (process 0,
  between barriers); when every step is unusable, raises CheckpointError naming ckpt_dir unless
  `restart_if_unreadable` (then all of them are moved aside and the run starts over).
  """
  steps = sorted(step_dirs(ckpt_dir), reverse=True)
  unusable, state, found = [], None, None
  for step in steps:
    path = os.path.join(ckpt_dir, str(step))
    try:
      state = _restore_step(path, step, target)
      found = step
      break
    except Exception as e:  # pylint: disable=broad-except
      # Whatever the damage (truncated array, bad JSON, missing file): this step is not usable.
      reason = _short(e)
      log(f"checkpoint {path} is not usable, skipped: {reason}")
      unusable.append((step, reason))
  if jax.process_count() > 1:
    chosen = multihost.broadcast_one_to_all(np.int32(-1 if found is None else found))
    if int(chosen) != (-1 if found is None else found):
      raise CheckpointError(
        f"process {jax.process_index()} restores step {found} of {ckpt_dir} but process 0 "
        f"restores {int(chosen)}: the processes do not see the same checkpoint files"
      )
  if unusable and found is None and not restart_if_unreadable:
    raise CheckpointError(
      f"no usable checkpoint in {ckpt_dir}: "
      + "; ".join(f"step {s}: {r}" for s, r in unusable)
      + ". Nothing was changed. Repair or remove them, or set "
      "config.checkpoint.restart_if_unreadable=True to start this run over (they are then moved "
      f"to {ckpt_dir}{UNUSABLE_SUFFIX}/)."
    )
  if unusable:
    _barrier("checkpoints:scanned")
    if jax.process_index() == 0:
      for step, _ in unusable:
        _move_aside(ckpt_dir, step)
    _barrier("checkpoints:moved")
    if found is None:
      log(f"no usable checkpoint in {ckpt_dir}: starting over (restart_if_unreadable)")
  return state, found


def _move_aside(ckpt_dir: str, step: int) -> str:
  """Renames ckpt_dir/<step> to <ckpt_dir>_unusable/<step>[.N] (kept for inspection)."""
  dest_dir = ckpt_dir.rstrip("/") + UNUSABLE_SUFFIX
  os.makedirs(dest_dir, exist_ok=True)
  dest, n = os.path.join(dest_dir, str(step)), 1
  while os.path.exists(dest):
    dest, n = os.path.join(dest_dir, f"{step}.{n}"), n + 1
  os.rename(os.path.join(ckpt_dir, str(step)), dest)
  return dest


def make_manager(ckpt_dir: str, *, keep: int, async_save: bool) -> ocp.CheckpointManager:
  """orbax's manager of ckpt_dir (keeps the newest `keep` steps; temporary directories of
  interrupted writes are removed when it starts)."""
  return ocp.CheckpointManager(
    ckpt_dir,
    options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    ),
  )


class Saver:
  """mngr.save(step, state) that fails loudly: errors name the step, and a write that did not
  complete (no commit marker once orbax is done with it) stops training at the next save or at
  `finish()`, with the previous checkpoints untouched."""

  def __init__(self, mngr: ocp.CheckpointManager, ckpt_dir: str):
    self.mngr, self.ckpt_dir = mngr, ckpt_dir
    self.pending: Optional[int] = None  # the step whose write has not been checked yet
    self.saved: Optional[int] = None  # the newest step checked complete

  def _fail(self, step: int, cause: str) -> CheckpointError:
    kept = sorted(s for s in step_dirs(self.ckpt_dir) if is_committed(self.ckpt_dir, s))
    return CheckpointError(
      f"writing the checkpoint of step {step} to {self.ckpt_dir} failed: {cause}. Training "
      f"stopped at step {step}; the complete checkpoints {kept} are intact and a restart "
      f"resumes from the newest (check free space and permissions first)."
    )

  def _check_pending(self) -> None:
    if self.pending is None:
      return
    step, self.pending = self.pending, None
    try:
      self.mngr.wait_until_finished()
      self.mngr.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._fail(step, _short(e)) from e
    if not is_committed(self.ckpt_dir, step):
      raise self._fail(
        step, f"the step has no {COMMIT_MARKER} after the write (orbax's log says why)"
      )
    self.saved = step

  def save(self, step: int, state: Any) -> None:
    """Checks the previous write, then starts this one (asynchronous unless configured not)."""
    self._check_pending()
    try:
      self.mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._fail(step, _short(e)) from e
    self.pending = step

  def finish(self) -> Optional[int]:
    """Waits for the last write and checks it; returns the newest complete step written."""
    self._check_pending()
    return self.saved

  def close(self) -> None:
    self.mngr.close()
