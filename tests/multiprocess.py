"""Launching a multi-process JAX job on one CPU for the tests (gloo collectives, CPU devices).

`run_processes` starts one Python process per spec dict, running a worker script given as source
text with the spec as JSON in argv[1]; each worker writes its result as JSON to spec["out"]. It
waits under a bounded timeout and kills the whole group when any process fails, so a broken peer
never leaves the other waiting for the distributed runtime. `final_params` reads a checkpoint's
parameters on the host, whatever mesh wrote it.
"""

from collections.abc import Callable, Sequence
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The first lines of every worker: the spec, a hard exit on errors (jax.distributed's shutdown
# would wait for the peer forever) and the checkout on sys.path.
WORKER_PRELUDE = r"""
import json, os, sys, traceback
spec = json.loads(sys.argv[1])

def _die(kind, value, tb):
  traceback.print_exception(kind, value, tb)
  sys.stdout.flush(); sys.stderr.flush()
  os._exit(1)
sys.excepthook = _die
sys.path.insert(0, spec["root"])
"""


def worker_env(num_devices: int) -> dict:
  """The environment of a worker: CPU only, `num_devices` CPU devices, gloo collectives."""
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    CUDA_VISIBLE_DEVICES="",
    TF_CPP_MIN_LOG_LEVEL="2",
    # conftest's XLA:CPU flag (rethink_jax.runtime) stays: without it the step is far slower.
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={num_devices}",
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    PYTHONPATH=ROOT,
  )
  return env


def run_processes(
  worker_source: str,
  specs: Sequence[dict],
  *,
  tmp: str,
  name: str,
  num_devices: int,
  timeout_s: float,
  on_poll: Callable[[list[subprocess.Popen]], None] | None = None,
) -> tuple[list[dict], list[str]]:
  """Runs WORKER_PRELUDE + worker_source once per spec, all at the same time.

  Args:
    worker_source: the worker's Python code after the prelude (it reads `spec`).
    specs: one JSON-serializable dict per process; spec["out"] is where the worker writes.
    tmp: directory for the script and the logs (`{name}_{i}.log`).
    name: the group's name in file names and failure messages.
    num_devices: CPU devices per process.
    timeout_s: limit for the whole group.
    on_poll: called with the processes about every 0.2 s while they run (e.g. to signal them).
  Returns:
    (the workers' output dicts, the workers' logs), in spec order.
  """
  script = os.path.join(tmp, f"{name}_worker.py")
  with open(script, "w") as f:
    f.write(WORKER_PRELUDE + worker_source)
  procs, logs = [], []
  try:
    for i, spec in enumerate(specs):
      log = open(os.path.join(tmp, f"{name}_{i}.log"), "w+")
      logs.append(log)
      procs.append(
        subprocess.Popen(
          [sys.executable, script, json.dumps(spec)],
          cwd=ROOT,
          env=worker_env(num_devices),
          stdout=log,
          stderr=subprocess.STDOUT,
          start_new_session=True,
        )
      )
    deadline = time.time() + timeout_s
    while any(p.poll() is None for p in procs):
      if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      if on_poll is not None:
        on_poll(procs)
      time.sleep(0.2)
    failed = [i for i, p in enumerate(procs) if p.poll() != 0]
    if failed:
      tails = []
      for i in failed:
        logs[i].seek(0)
        tails.append(f"--- {name} process {i} (rc {procs[i].poll()}):\n" + logs[i].read()[-4000:])
      pytest.fail(
        f"{name}: processes {failed} failed or timed out ({timeout_s:g} s)\n" + "\n".join(tails)
      )
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)  # the process group this launcher started
        p.wait(timeout=30)
    texts = []
    for log in logs:
      log.seek(0)
      texts.append(log.read())
      log.close()
  outs = []
  for spec in specs:
    with open(spec["out"]) as f:
      outs.append(json.load(f))
  return outs, texts


def final_params(ckpt_dir: str, step: int) -> dict[str, np.ndarray]:
  """The params of checkpoint `step` in ckpt_dir as {"/a/b": numpy array} (read on the host)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.join(ckpt_dir, str(step), "default")
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata.tree
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    state = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=meta, restore_args=restore_args))
  flat = {}

  def visit(prefix, tree):
    if isinstance(tree, dict):
      for k, v in tree.items():
        visit(f"{prefix}/{k}", v)
    else:
      flat[prefix] = np.asarray(tree)

  visit("", state["params"])
  return flat
