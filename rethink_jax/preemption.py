"""SIGTERM (preemption, maintenance, SLURM's warning before the kill) -> save at one step and exit.

Cloud TPU maintenance and spot preemption, GKE and SLURM (`--signal=TERM@...`) send SIGTERM some
time before they kill the job. The train loop asks `watch.reached(step)` after every step; it
returns True at one step, the same on every process, and the loop then saves a checkpoint there,
waits for it, and returns normally (exit status 0); the same command resumes from it.

  * Several processes (jax.distributed initialised): JAX's preemption sync manager catches the
    signal on any process, tells the others through the coordination service and picks the sync
    step (the largest step any process has reached, plus one):
    jax.experimental.multihost_utils.reached_preemption_sync_point. Every process must call
    `reached` at every step from the same start step.
  * One process: a Python SIGTERM handler sets a flag; the next step is the sync step. The
    previous handler is put back when the watch closes.
With several processes but JAX's preemption service disabled, SIGTERM keeps its default action.
"""

import signal
import threading
from typing import Optional

import jax
from jax.experimental import multihost_utils


def _sync_manager_running() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class PreemptionWatch:
  """Use as a context manager around training; `reached(step)` after each step."""

  def __init__(self):
    self.signalled = False
    self.step: Optional[int] = None  # the step at which the watch fired
    self._previous = None
    self._multi = jax.process_count() > 1
    # Without JAX's manager (jax_enable_preemption_service=False) the processes could not agree
    # on a step: SIGTERM then keeps its default action (the run resumes from its last save).
    self._enabled = not self._multi or _sync_manager_running()

  def __enter__(self) -> "PreemptionWatch":
    # JAX's manager has its own SIGTERM handler on several processes: leave it in place.
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    """True when training should save at `step` and stop (the same step on every process)."""
    if not self._enabled:
      hit = False
    elif self._multi:
      hit = bool(multihost_utils.reached_preemption_sync_point(step))
    else:
      hit = self.signalled
    if hit and self.step is None:
      self.step = step
    return hit
