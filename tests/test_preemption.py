"""Preemption of a two-process job on one CPU (2 JAX processes x 2 CPU devices, gloo).

A pair trains the tiny config for 8 steps uninterrupted. Another pair in a fresh workdir gets
SIGTERM on both processes once both have read the batch of step 3 (batches are read one ahead;
steps are slowed to ~1 s so the signal lands mid-run):
both must stop at the same step (JAX's preemption sync point), write one checkpoint there, log it
and exit with status 0. The same command then resumes it to step 8. Asserted: the agreed step is
the same in both processes and is the only new checkpoint; the resumed run starts after it; its
final parameters equal the uninterrupted run's (1e-6).
"""

import os
import signal
import textwrap

import numpy as np
import pytest

from tests import multiprocess

TIMEOUT_S = 420  # one pair: start-up, compile (cached), a few steps, on a busy 2-core machine
TOTAL_STEPS = 8

# One process of the job (after multiprocess.WORKER_PRELUDE).
_WORKER = textwrap.dedent(r"""
  import time
  from rethink_jax import distributed
  distributed.initialize(spec["coordinator"], 2, spec["process_id"], auto=False,
                         initialization_timeout=120)
  import jax
  import numpy as np
  from configs import tiny_shapes
  from rethink_jax import train
  from rethink_jax.data import stream

  c = tiny_shapes.get_config(str(spec["total_steps"]))
  c.data.data_dir = spec["data_dir"]
  c.data.num_parallel_calls = 1
  c.batch_size = 4
  c.schedule.decay_steps = (3,)  # the same LR function as tests/test_multihost.py: cached step
  c.eval_every = 0
  c.eval.at_end = False
  c.checkpoint.every_steps = 2
  c.checkpoint.keep = 3

  real = stream.make_train_iterator
  def slowed(*args, start_step=0, **kwargs):  # marks each step taken; slow after step 2
    for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step):
      if step >= 2 and spec.get("slow"):
        time.sleep(1.0)
      with open(spec["progress"], "a") as f:
        f.write(f"{step} {time.time():.1f}\n")
      yield batch
  stream.make_train_iterator = slowed

  r = train.train_and_evaluate(c, spec["workdir"])
  out = dict(step=r["step"], preempted=r["preempted"],
             history_steps=[h["step"] for h in r["history"]])
  with open(spec["out"], "w") as f:
    json.dump(out, f)
""")


def _steps_done(path):
  if not os.path.exists(path):
    return -1
  with open(path) as f:
    return max((int(line.split()[0]) for line in f if line.strip()), default=-1)


def _run_pair(tmp, name, workdir, data_dir, *, total_steps=TOTAL_STEPS, sigterm_after=None):
  """Runs the two processes; with sigterm_after=k, sends SIGTERM to both once both have taken
  step k. Returns (outputs, logs)."""
  from rethink_jax import distributed  # pylint: disable=g-import-not-at-top

  coordinator = f"127.0.0.1:{distributed.free_port()}"
  specs = [
    dict(
      root=multiprocess.ROOT,
      data_dir=data_dir,
      workdir=workdir,
      coordinator=coordinator,
      process_id=p,
      total_steps=total_steps,
      slow=sigterm_after is not None,
      progress=os.path.join(tmp, f"{name}_{p}.progress"),
      out=os.path.join(tmp, f"{name}_{p}.json"),
    )
    for p in range(2)
  ]
  signalled = []

  def signal_when_due(procs):
    if sigterm_after is None or signalled:
      return
    if all(_steps_done(s["progress"]) >= sigterm_after for s in specs):
      for p in procs:
        os.kill(p.pid, signal.SIGTERM)
      signalled.append(True)

  outs, logs = multiprocess.run_processes(
    _WORKER,
    specs,
    tmp=tmp,
    name=name,
    num_devices=2,
    timeout_s=TIMEOUT_S,
    on_poll=signal_when_due,
  )
  assert sigterm_after is None or signalled, "the run ended before both processes took the step"
  return outs, logs


def _final_params(workdir, step):
  return multiprocess.final_params(os.path.join(workdir, "checkpoints"), step)


@pytest.mark.slow
def test_sigterm_saves_at_one_agreed_step_and_resumes_exactly(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  tmp = str(tmp_path)
  data_dir = os.path.join(tmp, "tfds")
  shapes.ShapesInstances(config="tiny", data_dir=data_dir).download_and_prepare()
  full_dir, cut_dir = os.path.join(tmp, "full"), os.path.join(tmp, "cut")

  cut, logs = _run_pair(tmp, "cut", cut_dir, data_dir, sigterm_after=3)
  agreed = [o["step"] for o in cut]
  assert agreed[0] == agreed[1], cut  # one step for both processes
  stop = agreed[0]
  assert 1 <= stop < TOTAL_STEPS and all(o["preempted"] for o in cut), cut
  assert all(o["history_steps"][-1] == stop for o in cut), cut
  steps = sorted(int(s) for s in os.listdir(os.path.join(cut_dir, "checkpoints")) if s.isdigit())
  # Periodic checkpoints (every 2 steps) before the signal, and the agreed step's.
  assert steps[-1] == stop and all(s % 2 == 0 for s in steps[:-1]), steps
  assert f"every process stopped after step {stop}" in logs[0], logs[0][-3000:]

  resumed, logs = _run_pair(tmp, "resumed", cut_dir, data_dir)
  assert f"resumed from {os.path.join(cut_dir, 'checkpoints')} at step {stop}" in logs[0]
  for o in resumed:
    assert o["step"] == TOTAL_STEPS and not o["preempted"], o
    assert o["history_steps"] == list(range(stop + 1, TOTAL_STEPS + 1)), o

  full, _ = _run_pair(tmp, "full", full_dir, data_dir)
  assert [o["history_steps"] for o in full] == [list(range(1, TOTAL_STEPS + 1))] * 2
  want, got = _final_params(full_dir, TOTAL_STEPS), _final_params(cut_dir, TOTAL_STEPS)
  assert sorted(want) == sorted(got) and len(want) > 10
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-6, err_msg=k)
  # The runs trained: the final parameters are not the initial ones.
  first = _final_params(full_dir, 4)
  moved = max(float(np.abs(want[k] - first[k]).max()) for k in want)
  assert moved > 1e-4, moved
