"""Multi-host training on one CPU: two JAX processes on 127.0.0.1, two CPU devices each.

The pair (2 processes x 2 devices, gloo collectives) trains the tiny config for 2 steps, writes a
checkpoint, and is started again in the same workdir: it resumes and trains steps 3-4, then
evaluates. One process with 4 devices trains the same 4 steps uninterrupted on the same global
batches, continues a copy of the pair's step-2 workdir to step 4 (a checkpoint of 2 processes
resumed in 1) and evaluates the pair's step-4 checkpoint. Asserted:
  * per-step losses of the pair (both phases) == the single process (float tolerance);
  * the pair resumed from its own checkpoint (phase 2 starts at step 3);
  * one process resumed the pair's checkpoint: its steps 3-4 equal the pair's (losses, and the
    final parameters within the tolerance of tests/test_changed_slice.py);
  * each process read a disjoint half of every global batch (pipeline positions);
  * only process 0 wrote TensorBoard events;
  * the pair's evaluation (detections gathered from both processes) == the single process's
    evaluation of the same weights, every COCO metric.
Every subprocess runs under a bounded timeout and is killed when anything fails.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests import multiprocess

ROOT = multiprocess.ROOT
TIMEOUT_S = 420  # one phase (start-up, compile, a few steps, eval) on a busy 2-core machine

# One process of the job (after multiprocess.WORKER_PRELUDE). `spec`: see _spec in the test.
_WORKER = textwrap.dedent(r"""
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
  if spec.get("resume_workdir"):  # a workdir another job left: continue it in this one
    r = train.train_and_evaluate(c, spec["resume_workdir"])
    out.update(resumed_history=r["history"], resumed_step=r["step"])
  if spec.get("checkpoint_dir"):  # evaluate a checkpoint of another run: the same weights
    import orbax.checkpoint as ocp
    from rethink_jax import evaluate, optim, trainer
    from rethink_jax.data import pipeline
    from rethink_jax.data import stream
    sample = train.init_batch(next(stream.make_train_iterator(c.data, 1, seed=0)))
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


def _run_group(specs, num_devices, tmp, name):
  return multiprocess.run_processes(
    _WORKER, specs, tmp=tmp, name=name, num_devices=num_devices, timeout_s=TIMEOUT_S
  )[0]


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
  resumed_dir = os.path.join(tmp, "pair_resumed_in_one")

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
  # The pair's workdir at step 2, for one process to continue (the pair goes on in its own).
  shutil.copytree(pair_dir, resumed_dir)
  t1 = time.time()
  second = pair("pair2", workdir=pair_dir, total_steps=4, evaluate=True)
  t2 = time.time()
  # One process, 4 devices: the same 4 steps uninterrupted, the pair's step-2 workdir continued
  # to step 4 (compiled steps shared), then an evaluation of the pair's step-4 weights.
  single = _run_group(
    [
      spec(
        "single",
        workdir=single_dir,
        resume_workdir=resumed_dir,
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
    first=first,
    second=second,
    single=single[0],
    pair_dir=pair_dir,
    single_dir=single_dir,
    resumed_dir=resumed_dir,
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
def test_checkpoint_of_two_processes_resumes_in_one(runs):
  # One process with 4 devices continued the pair's step-2 workdir through train_and_evaluate:
  # steps 3-4 only, with the losses of the pair's own continuation and parameters that equal
  # its step-4 ones within tests/test_changed_slice.py's tolerances (losses 1e-5 relative, the
  # update since the checkpoint within 1e-3 of its largest entry).
  single = runs["single"]
  resumed = _losses(single["resumed_history"])
  pair = _losses(runs["second"][0]["history"])
  assert sorted(resumed) == [3, 4] and single["resumed_step"] == 4, sorted(resumed)
  loss_diff = max(
    abs(resumed[step][k] - v) / abs(v) for step, losses in pair.items() for k, v in losses.items()
  )
  assert loss_diff <= 1e-5, (loss_diff, resumed, pair)
  ckpts = lambda d: os.path.join(d, "checkpoints")  # noqa: E731
  at2 = multiprocess.final_params(ckpts(runs["pair_dir"]), 2)
  want = multiprocess.final_params(ckpts(runs["pair_dir"]), 4)
  got = multiprocess.final_params(ckpts(runs["resumed_dir"]), 4)
  assert sorted(got) == sorted(want) == sorted(at2) and len(want) > 10
  update_max = max(float(np.abs(want[k] - at2[k]).max()) for k in want)
  assert update_max > 1e-4, update_max  # the two steps moved the parameters
  worst = max(float(np.abs(got[k] - want[k]).max()) for k in want) / update_max
  assert worst <= 1e-3, worst
  print(f"2 processes -> 1: losses within {loss_diff:.1e} (relative), parameters {worst:.1e}")


@pytest.mark.slow
def test_pair_reads_disjoint_shards():
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  for step in (0, 1, 7):
    mine = [stream.train_positions(step, 2, p, 2) for p in range(2)]
    assert not set(mine[0].tolist()) & set(mine[1].tolist())
    # Together they are exactly the single process's global batch, in device order.
    np.testing.assert_array_equal(np.concatenate(mine), stream.train_positions(step, 4, 0, 1))


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
