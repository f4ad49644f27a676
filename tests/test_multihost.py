"""Multi-host training on one CPU: two JAX processes on 127.0.0.1, two CPU devices each.

The pair (2 processes x 2 devices, gloo collectives) trains the tiny config for 2 steps, writes a
checkpoint, and is started again in the same workdir: it resumes and trains steps 3-4, then
evaluates. One process with 4 devices trains the same 4 steps uninterrupted on the same global
batches and evaluates the pair's step-4 checkpoint. Asserted:
  * per-step losses of the pair (both phases) == the single process (float tolerance);
  * the pair resumed from its own checkpoint (phase 2 starts at step 3);
  * each process read a disjoint half of every global batch (pipeline positions);
  * only process 0 wrote TensorBoard events;
  * the pair's evaluation (detections gathered from both processes) == the single process's
    evaluation of the same weights, every COCO metric.
Every subprocess runs under a bounded timeout and is killed when anything fails.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420  # one phase (start-up, compile, a few steps, eval) on a busy 2-core machine

# One process of the job. argv[1]: a JSON spec (see _spec in the test).
_WORKER = textwrap.dedent(r"""
  import json, os, sys, traceback
  spec = json.loads(sys.argv[1])

  def _die(kind, value, tb):  # exit now: jax.distributed's shutdown would wait for the peer
    traceback.print_exception(kind, value, tb)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(1)
  sys.excepthook = _die
  sys.path.insert(0, spec["root"])
  from rethink_jax import distributed
  info = distributed.initialize(spec.get("coordinator"), spec.get("num_processes"),
                                spec.get("process_id"), auto=False, initialization_timeout=120)
  import jax
  import numpy as np
  from configs import tiny_shapes
  from rethink_jax import train

  c = tiny_shapes.get_config(str(spec["total_steps"]))
  c.data.data_dir = spec["data_dir"]
  c.data.num_parallel_calls = 1
  c.batch_size = 4
  c.schedule.total_steps = spec["total_steps"]
  c.schedule.decay_steps = (3,)  # the same LR at every step, whatever total_steps
  c.eval_every = 0
  c.eval.at_end = spec["evaluate"]
  c.eval.batch_size = 4
  c.checkpoint.every_steps = 2
  c.checkpoint.keep = 3
  out = dict(info=info, devices=[[d.id, d.process_index] for d in jax.devices()])
  if spec.get("workdir"):
    r = train.train_and_evaluate(c, spec["workdir"])
    out.update(history=r["history"], metrics=r["metrics"], step=r["step"])
  if spec.get("checkpoint_dir"):  # evaluate a checkpoint of another run: the same weights
    import orbax.checkpoint as ocp
    from rethink_jax import evaluate, optim, trainer
    from rethink_jax.data import pipeline
    sample = train.init_batch(next(pipeline.make_train_iterator(c.data, 1, seed=0)))
    sched = optim.resolve_schedule(c.schedule, c.optim, c.batch_size)
    parts = train.build_parts(c, sched, trainer.make_mesh(), sample)
    mngr = ocp.CheckpointManager(spec["checkpoint_dir"])
    state = mngr.restore(spec["checkpoint_step"], args=ocp.args.StandardRestore(
        trainer.abstract_state_with_shardings(parts)))
    variables = trainer.variables_of(state)
    predict = parts.predict_fn
    metrics = evaluate.evaluate(
        lambda b: predict(variables, b),
        pipeline.make_eval_iterator(c.data, 4 // jax.process_count()),
        pipeline.get_coco_gt(c.data), pipeline.category_ids(c.data),
        output_json=spec["results_json"])
    out.update(eval_metrics=metrics)
  with open(spec["out"], "w") as f:
    json.dump(out, f, default=float)
""")


def _env(num_devices):
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    CUDA_VISIBLE_DEVICES="",
    TF_CPP_MIN_LOG_LEVEL="2",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    PYTHONPATH=ROOT,
  )
  return env


def _run_group(specs, num_devices, tmp, name):
  """Starts one process per spec, waits for all (bounded), kills all on any failure.
  Returns the processes' output dicts."""
  script = os.path.join(tmp, "worker.py")
  with open(script, "w") as f:
    f.write(_WORKER)
  procs, logs = [], []
  try:
    for i, spec in enumerate(specs):
      log = open(os.path.join(tmp, f"{name}_{i}.log"), "w+")
      logs.append(log)
      procs.append(
        subprocess.Popen(
          [sys.executable, script, json.dumps(spec)],
          cwd=ROOT,
          env=_env(num_devices),
          stdout=log,
          stderr=subprocess.STDOUT,
          start_new_session=True,
        )
      )
    deadline = time.time() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
      if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.5)
    failed = [i for i, p in enumerate(procs) if p.poll() != 0]
    if failed:
      tails = []
      for i in failed:
        logs[i].seek(0)
        tails.append(f"--- {name} process {i} (rc {procs[i].poll()}):\n" + logs[i].read()[-4000:])
      pytest.fail(
        f"{name}: processes {failed} failed or timed out after {TIMEOUT_S} s\n" + "\n".join(tails)
      )
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)  # the process group this test started
        p.wait(timeout=30)
    for log in logs:
      log.close()
  out = []
  for spec in specs:
    with open(spec["out"]) as f:
      out.append(json.load(f))
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax import distributed  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  tmp = str(tmp_path_factory.mktemp("multihost"))
  data_dir = os.path.join(tmp, "tfds")
  shapes.ShapesInstances(config="tiny", data_dir=data_dir).download_and_prepare()
  pair_dir, single_dir = os.path.join(tmp, "pair"), os.path.join(tmp, "single")

  def spec(name, **kw):
    s = dict(
      root=ROOT,
      data_dir=data_dir,
      evaluate=False,
      total_steps=4,
      out=os.path.join(tmp, f"{name}.json"),
    )
    s.update(kw)
    return s

  def pair(name, **kw):
    addr = f"127.0.0.1:{distributed.free_port()}"
    return _run_group(
      [
        spec(f"{name}_{p}", coordinator=addr, num_processes=2, process_id=p, **kw) for p in range(2)
      ],
      2,
      tmp,
      name,
    )

  t0 = time.time()
  first = pair("pair1", workdir=pair_dir, total_steps=2)
  t1 = time.time()
  second = pair("pair2", workdir=pair_dir, total_steps=4, evaluate=True)
  t2 = time.time()
  # One process, 4 devices: the same 4 steps uninterrupted, then the pair's step-4 weights.
  single = _run_group(
    [
      spec(
        "single",
        workdir=single_dir,
        checkpoint_dir=os.path.join(pair_dir, "checkpoints"),
        checkpoint_step=4,
        results_json=os.path.join(tmp, "single_results.json"),
      )
    ],
    4,
    tmp,
    "single",
  )
  print(
    f"phases: pair {t1 - t0:.0f} s, pair resumed {t2 - t1:.0f} s, single {time.time() - t2:.0f} s"
  )
  return dict(
    first=first, second=second, single=single[0], pair_dir=pair_dir, single_dir=single_dir
  )


def _losses(history):
  return {
    h["step"]: {k: v for k, v in h.items() if k.startswith("loss_") or k == "total_loss"}
    for h in history
  }


@pytest.mark.slow
def test_pair_joins_one_job(runs):
  for p, r in enumerate(runs["first"] + runs["second"]):
    assert r["info"]["mode"] == "explicit", r["info"]
    assert r["info"]["process_count"] == 2 and r["info"]["process_index"] == p % 2, r["info"]
    # Every process sees the 4 devices of the job; each owns 2.
    assert len(r["devices"]) == 4, r["devices"]
    assert sorted(pi for _, pi in r["devices"]) == [0, 0, 1, 1], r["devices"]
  assert runs["single"]["info"] == dict(mode="single", process_index=0, process_count=1)


@pytest.mark.slow
def test_pair_losses_equal_single_process_and_resume(runs):
  first = [_losses(r["history"]) for r in runs["first"]]
  second = [_losses(r["history"]) for r in runs["second"]]
  single = _losses(runs["single"]["history"])
  assert sorted(single) == [1, 2, 3, 4], sorted(single)
  # Phase 1 ran steps 1-2; phase 2 resumed from the pair's step-2 checkpoint: steps 3-4 only.
  assert [sorted(f) for f in first] == [[1, 2]] * 2, first
  assert [sorted(s) for s in second] == [[3, 4]] * 2, second
  assert [r["step"] for r in runs["second"]] == [4, 4]
  for proc in range(2):
    # Both processes report the same (global) losses.
    pair = {**first[proc], **second[proc]}
    for step, losses in single.items():
      for k, v in losses.items():
        tol = 1e-5 if step == 1 else 1e-4  # later steps: all-reduce order differs slightly
        np.testing.assert_allclose(
          pair[step][k], v, rtol=tol, atol=1e-6, err_msg=f"process {proc} step {step} {k}"
        )
  assert all(np.isfinite(v) for s in single.values() for v in s.values())


@pytest.mark.slow
def test_pair_reads_disjoint_shards():
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  for step in (0, 1, 7):
    mine = [pipeline.train_positions(step, 2, p, 2) for p in range(2)]
    assert not set(mine[0].tolist()) & set(mine[1].tolist())
    # Together they are exactly the single process's global batch, in device order.
    np.testing.assert_array_equal(np.concatenate(mine), pipeline.train_positions(step, 4, 0, 1))


@pytest.mark.slow
def test_only_process_zero_writes(runs):
  events = glob.glob(os.path.join(runs["pair_dir"], "**", "events.out.tfevents*"), recursive=True)
  assert len(events) == 2, events  # one per phase, both from process 0
  assert os.path.exists(os.path.join(runs["pair_dir"], "eval_curve.json"))
  steps = sorted(
    int(s) for s in os.listdir(os.path.join(runs["pair_dir"], "checkpoints")) if s.isdigit()
  )
  assert steps == [2, 4], steps


@pytest.mark.slow
def test_pair_eval_equals_single_process_eval_of_same_weights(runs):
  pair = [r["metrics"] for r in runs["second"]]
  single = runs["single"]["eval_metrics"]
  assert pair[0] == pair[1]  # broadcast from process 0
  assert set(single) == set(pair[0]) and "segm/AP" in single and "bbox/AP" in single
  for k, v in single.items():
    np.testing.assert_allclose(pair[0][k], v, rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=k)
  print("AP after 4 steps:", {k: single[k] for k in ("bbox/AP", "segm/AP", "bbox/AR100")})


# ------------------------------------------------------------------------------------------------
# rethink_jax.distributed without a cluster (fast).
# ------------------------------------------------------------------------------------------------
def _initialize_in_subprocess(env_extra):
  """distributed.initialize() in a fresh process (before any backend starts), with env_extra."""
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(
      ("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "KUBERNETES_")
    )
  }
  env.update(env_extra, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  code = (
    "import json; from rethink_jax import distributed; "
    "print(json.dumps(distributed.initialize(initialization_timeout=60)))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_initialize_uses_jax_cluster_detection():
  from rethink_jax import distributed  # pylint: disable=g-import-not-at-top

  # No cluster: JAX detects nothing, one process.
  assert _initialize_in_subprocess({}) == dict(mode="single", process_index=0, process_count=1)
  # A SLURM job step (srun) of one task on this machine: JAX reads the job from SLURM_*.
  slurm = dict(
    SLURM_JOB_ID="7",
    SLURM_STEP_NODELIST="127.0.0.1",
    SLURM_NTASKS="1",
    SLURM_PROCID="0",
    SLURM_LOCALID="0",
    JAX_COORDINATOR_PORT=str(distributed.free_port()),
  )
  assert _initialize_in_subprocess(slurm) == dict(mode="auto", process_index=0, process_count=1)


def test_initialize_single_process_and_bad_arguments():
  from rethink_jax import distributed  # pylint: disable=g-import-not-at-top

  info = distributed.initialize(auto=False)
  assert info == dict(mode="single", process_index=0, process_count=1)
  assert distributed.initialize("127.0.0.1:1", 1, 0)["mode"] == "single"  # a job of one
  assert distributed.is_main_process()
  distributed.sync("no-op on one process")
  with pytest.raises(ValueError, match="needs num_processes and process_id"):
    distributed.initialize("127.0.0.1:1")
  with pytest.raises(ValueError, match="not in"):
    distributed.initialize("127.0.0.1:1", 2, 2)
  with pytest.raises(ValueError, match="needs a coordinator_address"):
    distributed.initialize(num_processes=2, process_id=0)
  assert 0 < distributed.free_port() < 65536
