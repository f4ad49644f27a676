r"""Training and evaluation of Mask R-CNN: `train_and_evaluate(config, workdir)`.

The detection task on rethink_jax.trainer's skeleton (mesh, state, jitted step, shardings): its
loss is the model's training losses, its predict the detections. Every host runs the same code:
  * `build_parts(config, sched, mesh, sample)`: THE model, optimizer, state layout and jitted
    init / train step / predict of a config, used by training, scripts/benchmark_model.py,
    scripts/profile_model.py and scripts/tpu_compile.py alike;
  * each process reads its own shard of the data (data/stream.py); its host batches become
    one global batch sharded on the mesh's "data" axis;
  * orbax checkpoints (asynchronous, every `checkpoint.every_steps` and at the end, the last
    `checkpoint.keep` kept); a run started again in the same workdir resumes exactly: parameters,
    optimizer state, batch statistics, step, rng, and the data position (the pipeline's
    start_step). Faults (rethink_jax/checkpoints.py, rethink_jax/preemption.py): an unwritable
    workdir fails before training; a damaged newest checkpoint is skipped for the newest one
    that restores; a failed write stops training naming the step; SIGTERM saves at a step all
    processes agree on and returns (exit status 0);
  * a new run starts from `init_from` (a backbone checkpoint) or `init_from_detector` (a whole
    detector) when set (rethink_jax/warm_start.py);
  * a loss that is not finite stops the run (NonFiniteLossError naming the step and the batch's
    image ids); the step that produced it is not applied and no checkpoint of it is written;
  * clu metric writers (TensorBoard + console): every loss, the LR, images seen, step time and the
    time spent waiting for data; periodic COCO evaluation (bbox, segm and, with keypoint_on,
    keypoints AP) every `eval_every` steps and at the end, also appended to
    workdir/eval_curve.json:
      [{"step", "images_seen", "wall_s", "eval_s", "bbox/AP", "segm/AP", ... all COCO metrics}];
    each evaluation also records the detections of a few fixed validation images in
    workdir/eval_images/ and draws some of them to TensorBoard (rethink_jax/visualize.py);
  * `evaluate_only(config, workdir)`: the COCO metrics of workdir's latest checkpoint (or of the
    detector init_from_detector) on the recipe's evaluation split, in workdir/eval_metrics.json.

Usage: python -m rethink_jax.main --config configs/FILE.py[:ARG] --workdir DIR [--config.a.b=v]
       [--mode=eval]
"""

import collections
from collections.abc import Iterator
import functools
import json
import os
import time
from typing import Any

from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from rethink_jax import checkpoints
from rethink_jax import files
from rethink_jax import optim
from rethink_jax import preemption
from rethink_jax import trainer
from rethink_jax import tta
from rethink_jax import visualize
from rethink_jax import warm_start

CURVE_FILE = "eval_curve.json"
EVAL_FILE = "eval_metrics.json"  # evaluate_only's output
# What train_and_evaluate raises when a step is not finite (callers catch it as train's).
NonFiniteLossError = trainer.NonFiniteLossError


def _log(msg: str) -> None:
  trainer.log(msg, "train")


# ------------------------------------------------------------------------------------------------
# Parameters: counting.
# ------------------------------------------------------------------------------------------------
def _flat(tree: Any) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree) if tree else {}, sep="/")


def parameter_counts(state: dict, frozen_prefixes) -> dict:
  """{"total", "trainable", "frozen", "batch_stats"} scalar counts of the model's variables.

  frozen = parameters under `frozen_prefixes` (zero updates) + the "frozen" collection
  (FrozenBN affines); batch_stats (BN running statistics) are counted apart.
  """
  count = lambda tree: int(parameter_overview.count_parameters(tree)) if tree else 0
  labels = _flat(optim.param_labels(state["params"], frozen_prefixes))
  frozen_params = count({k: v for k, v in _flat(state["params"]).items() if labels[k] == "frozen"})
  total_params = count(state["params"])
  frozen_coll = count(state["collections"].get("frozen", {}))
  return dict(
    total=total_params + frozen_coll,
    trainable=total_params - frozen_params,
    frozen=frozen_params + frozen_coll,
    batch_stats=count(state["collections"].get("batch_stats", {})),
  )


# ------------------------------------------------------------------------------------------------
# The detection task: init, loss, predict, and the parts of a config.
# ------------------------------------------------------------------------------------------------
INIT_RNGS = ("params", "sampling")


def init_batch(batch: dict) -> dict:
  """A one-image batch with the shapes and dtypes of `batch` for model.init: a blank image
  filling the padded size, no instances (the same on every process, whatever its data)."""
  out = {k: np.zeros((1,) + np.shape(v)[1:], np.asarray(v).dtype) for k, v in batch.items()}
  h, w = np.shape(batch["image"])[1:3]
  for key in ("image_hw", "orig_hw"):
    if key in out:
      out[key][:] = (h, w)
  if "scale" in out:
    out["scale"][:] = 1
  if "valid" in out:
    out["valid"][:] = True
  return out


def init_variables(model, rngs: dict, batch: dict) -> dict:
  """The model's variables for a batch (rngs: "params", "sampling")."""
  return model.init(rngs, batch, train=False)


def loss_fn(model, params, collections, batch: dict, rng):
  """The sum of the model's "loss_*" terms (float32) and (every loss, updated batch_stats)."""
  losses, new_coll = model.apply(
    {"params": params, **collections},
    batch,
    train=True,
    rngs={"sampling": rng},
    mutable=["batch_stats"],
  )
  losses = {k: jnp.asarray(v, jnp.float32) for k, v in losses.items()}
  total = sum(v for k, v in losses.items() if k.startswith("loss_"))
  return total, (losses, new_coll)


def predict(model, variables: dict, batch: dict) -> dict:
  """The model's detections of a batch (rethink_jax.models.mask_rcnn's inference outputs)."""
  return model.apply(variables, batch, train=False)


_PARTS_CACHE: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()


def build_parts(config: ml_collections.ConfigDict, sched: dict, mesh: Mesh, sample: dict):
  """The model, optimizer and jitted init / train step / predict of a config on `mesh`.

  config: a recipe (its model and optim groups are used); sched: optim.resolve_schedule's dict;
  sample: a batch (arrays or ShapeDtypeStructs) with the shapes of the batches to come.
  Returns trainer.build's parts plus frozen_prefixes (the backbone stages held at zero update).

  Memoized on (model, optim, schedule, shapes, mesh): a process that calls train_and_evaluate
  several times with the same model and schedule (tests, resumed runs, sweeps over seeds or data)
  traces and compiles the step once.
  """
  from rethink_jax import models  # pylint: disable=g-import-not-at-top

  key = (
    json.dumps(
      [
        config.model.to_json_best_effort(sort_keys=True),
        config.optim.to_json_best_effort(sort_keys=True),
        # only what the LR function depends on (not total_steps)
        [
          str(sched[k])
          for k in ("base_lr", "decay_steps", "decay_factor", "warmup_steps", "warmup_factor")
        ],
        sorted((k, v.shape, str(v.dtype)) for k, v in sample.items()),
      ]
    ),
    mesh,
    jax.process_index(),
  )
  if key in _PARTS_CACHE:
    _PARTS_CACHE.move_to_end(key)
    return _PARTS_CACHE[key]
  frozen_prefixes = models.frozen_param_prefixes(
    int(config.model.backbone.freeze_at), prefix=("backbone", "bottom_up")
  )
  parts = trainer.build(
    models.build_model(config.model),
    mesh,
    sample,
    init_variables=init_variables,
    loss_fn=loss_fn,
    predict=predict,
    init_rngs=INIT_RNGS,
    make_optimizer=lambda shapes: optim.make_optimizer(
      config.optim, sched, shapes, frozen_prefixes
    ),
  )
  parts.frozen_prefixes = frozen_prefixes
  _PARTS_CACHE[key] = parts
  while len(_PARTS_CACHE) > 4:  # compiled executables hold memory
    _PARTS_CACHE.popitem(last=False)
  return parts


# ------------------------------------------------------------------------------------------------
# COCO evaluation of the recipe's evaluation split.
# ------------------------------------------------------------------------------------------------
def eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.data with eval_split cut to its first config.eval.num_images images (0: all)."""
  num_eval = int(config.eval.get("num_images", 0) or 0)
  if num_eval <= 0 or "[" in config.data.eval_split:
    return config.data
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.eval_split = f"{config.data.eval_split}[:{num_eval}]"
  return data


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """The global evaluation batch: config.eval.batch_size rounded down to a multiple of the
  device count (at least one image per device)."""
  n_dev = jax.device_count()
  size = int(config.eval.get("batch_size", n_dev))
  return max(n_dev, size - size % n_dev)


def make_evaluator(config: ml_collections.ConfigDict, parts, workdir: str | None = None):
  """evaluate(variables, step) -> the COCO metrics {"bbox/AP", "segm/AP", "keypoints/AP", ...}
  (floats, NaN where COCOeval has none; each type the model predicts) of the recipe's evaluation
  split; parts: build_parts' (its predict_fn, or with config.eval.tta.enabled rethink_jax.tta's
  on its model). The ground truth is read once, on the first call.

  With a workdir, process 0 also records the detections of config.eval.record_images images
  (rethink_jax.visualize) and evaluate returns (metrics, TensorBoard images)."""
  from rethink_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  data, n_proc = eval_data_config(config), jax.process_count()
  per_process = eval_batch_size(config) // n_proc
  predict_fn, make_batches = parts.predict_fn, pipeline.make_eval_iterator
  if tta.enabled(config):
    predict_fn = tta.make_predict_fn(parts, config)
    make_batches = functools.partial(tta.eval_batches, tta_config=config.eval.tta)
  cache = {}

  def evaluate(variables: dict, step: int = 0):
    if not cache:
      cache.update(gt=pipeline.get_coco_gt(data), ids=pipeline.category_ids(data))
      # OKS sigmas of the data set's keypoints (None without keypoints).
      meta = pipeline.get_builder(data).info.metadata
      cache["sigmas"] = meta.get("keypoint_oks_sigmas")
    batches = make_batches(
      data, per_process, process_index=jax.process_index(), process_count=n_proc
    )
    metrics, results = evaluate_lib.evaluate(
      lambda b: predict_fn(variables, b),
      batches,
      cache["gt"],
      cache["ids"],
      keypoint_oks_sigmas=cache["sigmas"],
      return_results=True,
    )
    metrics = {k: float(v) for k, v in metrics.items()}
    if workdir is None:
      return metrics
    images = {}
    if jax.process_index() == 0:
      images = visualize.record_evaluation(
        data,
        workdir,
        step,
        results,
        num_images=int(config.eval.get("record_images", 6)),
        num_tensorboard=int(config.eval.get("tensorboard_images", 3)),
        coco_gt=cache["gt"],
      )
    return metrics, images

  return evaluate


# ------------------------------------------------------------------------------------------------
# Resuming.
# ------------------------------------------------------------------------------------------------
def restore_checkpoint(config: ml_collections.ConfigDict, ckpt_dir: str, parts) -> tuple:
  """(state, step) of ckpt_dir's newest checkpoint that restores, or (None, None) with none;
  damaged newer ones are logged and moved aside (rethink_jax.checkpoints.restore_latest)."""
  state, step = checkpoints.restore_latest(
    ckpt_dir,
    trainer.abstract_state_with_shardings(parts),
    restart_if_unreadable=bool(config.checkpoint.get("restart_if_unreadable", False)),
    log=_log,
  )
  if step is not None:
    _log(f"resumed from {ckpt_dir} at step {step}")
  return state, step


def missing_evaluation(config, curve: list, step: int, total_steps: int) -> bool:
  """Whether the run resumed at `step` owes that step's evaluation: one was due there (every
  eval_every steps, or the final one) but the curve lacks it (a kill or a preemption after the
  checkpoint, before the evaluation was written)."""
  eval_every = int(config.get("eval_every", 0) or 0)
  if step <= 0 or any(p["step"] == step for p in curve):
    return False
  due = eval_every > 0 and (step % eval_every == 0 or step == total_steps)
  return due or (step == total_steps and config.eval.get("at_end", True))


# ------------------------------------------------------------------------------------------------
# The curve file (compare.py reads it through read_curve).
# ------------------------------------------------------------------------------------------------
def read_curve(workdir: str) -> list:
  """workdir's evaluations [{"step", "images_seen", "wall_s", "eval_s", "bbox/AP", ...}]."""
  return files.read_json(os.path.join(workdir, CURVE_FILE), default=[])


def _write_curve(workdir: str, curve: list) -> None:
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, CURVE_FILE), curve, indent=1)


# ------------------------------------------------------------------------------------------------
# train_and_evaluate.
# ------------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the config's model, evaluating along the way; resumes from workdir's checkpoints.

  Args:
    config: a configs/*.py ConfigDict (groups model, data, optim, schedule, eval, checkpoint;
      top level seed, batch_size, init_from, init_from_detector, eval_every, log_every).
    workdir: output directory: checkpoints/, TensorBoard events, config.json, eval_curve.json.

  Returns:
    {"metrics": the last evaluation's metrics ({"bbox/AP", "segm/AP", ...}, {} if none),
     "curve": every evaluation of this workdir [{"step", "images_seen", "wall_s", ...}],
     "history": the logged train metrics of this call [{"step", "loss_*", "lr", ...}],
     "step": the final step, "train_step_compilations": 1 unless something recompiled,
     "preempted": True when a SIGTERM stopped it early (a checkpoint of "step" was written)}.
  Raises NonFiniteLossError when a loss or gradient is not finite, stream.BadRecordError when a
  training record does not decode (unless config.data.skip_bad_records), trainer.DataStallError
  when the data stalls longer than config.data_timeout_s, checkpoints.CheckpointError
  when the workdir cannot hold checkpoints, a write fails, or no existing checkpoint restores.
  """
  with preemption.PreemptionWatch() as watch:
    return _train_and_evaluate(config, workdir, watch)


def _train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, watch: preemption.PreemptionWatch
) -> dict:
  from rethink_jax.data import recipe as data_recipe  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  # Before anything runs: the data set is built, the class count agrees with it (0 = take it).
  config = data_recipe.resolve_config(config)
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  checkpoints.check_writable(ckpt_dir)  # before anything else: a bad workdir fails at once
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=1))

  # == Mesh and batch ==========================================================================
  mesh = trainer.make_mesh()
  n_dev, n_proc = jax.device_count(), jax.process_count()
  batch_size = int(config.batch_size)
  if batch_size % n_dev:
    raise ValueError(
      f"config.batch_size={batch_size} must be a multiple of the number of devices ({n_dev})"
    )
  local_batch = batch_size // n_proc
  sched = optim.resolve_schedule(config.schedule, config.optim, batch_size)
  total_steps = sched["total_steps"]
  _log(
    f"{n_proc} process(es), {n_dev} device(s) ({jax.devices()[0].platform}); global batch "
    f"{batch_size} ({local_batch} per process); {total_steps} steps, LR {sched['base_lr']:g} "
    f"x{sched['decay_factor']:g} at {sched['decay_steps']}, warmup {sched['warmup_steps']} "
    f"from {sched['warmup_factor']:.3g}"
  )

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

  # == Checkpoints =============================================================================
  ckpt_cfg = config.checkpoint
  # The data position follows the newest complete step; restore_latest confirms it below.
  resume_step = max(
    (s for s in checkpoints.step_dirs(ckpt_dir) if checkpoints.is_committed(ckpt_dir, s)),
    default=None,
  )
  start_step = int(resume_step or 0)
  pretrained = config.get("init_from") or config.get("init_from_detector")
  if resume_step is None and config.get("require_init_from") and not pretrained:
    raise ValueError(
      "this recipe fine-tunes pre-trained weights: set --config.init_from=DIR "
      "(a backbone checkpoint written by rethink_jax.convert or pre-training) or "
      "--config.init_from_detector=DIR (a whole detector)"
    )

  # == Data ====================================================================================
  def train_data(step: int) -> Iterator:
    """This process's batches from `step` on (deterministic in the seed and the step)."""
    return stream.make_train_iterator(
      config.data,
      local_batch,
      seed=int(config.seed),
      start_step=step,
      process_index=jax.process_index(),
      process_count=n_proc,
    )

  train_iter = train_data(start_step)
  first = next(train_iter)

  # == Model, optimizer, state =================================================================
  sample = init_batch(first)
  rng = jax.random.PRNGKey(int(config.seed))
  parts = build_parts(config, sched, mesh, sample)
  train_step = parts.train_step

  state, found = restore_checkpoint(config, ckpt_dir, parts)
  if found != resume_step:  # the newest step was damaged: the data restarts where the state is
    resume_step, start_step = found, int(found or 0)
    train_iter = train_data(start_step)
    first = next(train_iter)
  saver = checkpoints.Saver(
    checkpoints.make_manager(
      ckpt_dir,
      keep=int(ckpt_cfg.get("keep", 3)),
      async_save=bool(ckpt_cfg.get("async_save", True)),
    ),
    ckpt_dir,
  )
  mngr = saver.mngr
  if resume_step is None:
    state = warm_start.initial_state(config, parts, rng, sample)
  parameter_overview.log_parameter_overview(
    state["params"], include_stats=False, msg="parameters", jax_logging_process=0
  )
  counts = parameter_counts(state, parts.frozen_prefixes)
  _log(
    f"parameters: {counts['total']:,} ({counts['trainable']:,} trainable, "
    f"{counts['frozen']:,} frozen; {counts['batch_stats']:,} batch statistics)"
  )

  # == Evaluation ==============================================================================
  curve = [p for p in read_curve(workdir) if p["step"] <= start_step]
  wall_offset = curve[-1].get("wall_s", 0.0) if curve else 0.0
  evaluate = make_evaluator(config, parts, workdir)

  def run_eval(state, step):
    t0 = time.time()
    metrics, images = evaluate(trainer.variables_of(state), step)
    # COCOeval's "undefined" (no object of that size) is NaN: null in JSON.
    point = {
      "step": int(step),
      "images_seen": int(step) * batch_size,
      "wall_s": wall_offset + time.time() - t_start,
      "eval_s": time.time() - t0,
      **{k: (None if np.isnan(v) else v) for k, v in metrics.items()},
    }
    curve[:] = [p for p in curve if p["step"] != step] + [point]
    _write_curve(workdir, curve)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    if images:
      writer.write_images(step, images)
    _log(
      f"step {step}: "
      + ", ".join(
        f"{k} {metrics[k]:.2f}" for k in ("bbox/AP", "segm/AP", "keypoints/AP") if k in metrics
      )
      + f" ({time.time() - t0:.0f} s)"
    )
    return metrics

  # == Train loop ==============================================================================
  log_every = max(1, int(config.get("log_every", 20)))
  eval_every = int(config.get("eval_every", 0) or 0)
  ckpt_every = int(ckpt_cfg.get("every_steps", 0) or 0)
  progress = periodic_actions.ReportProgress(
    num_train_steps=total_steps, writer=writer, every_secs=60.0
  )
  image_ids = collections.deque(maxlen=log_every + 1)  # (step, this process's image ids)
  history, last_metrics = [], {}
  data_wait, t_interval, steps_in_interval = 0.0, time.time(), 0
  batches = trainer.with_timeout(
    _prepend(first, train_iter), float(config.get("data_timeout_s", 0) or 0), start_step
  )

  def describe_bad_step(bad, m):
    """The NaN stop's message; waits for the checkpoints and closes the writers first."""
    mngr.wait_until_finished()
    ids = {s: v for s, v in image_ids}.get(bad)
    good = mngr.latest_step()
    losses = {k: float(v) for k, v in m.items() if k.startswith("loss_") or k == "total_loss"}
    writer.flush()
    mngr.close()
    return (
      f"non-finite loss or gradient at train step {bad} (detected at step {step}); "
      f"image ids of that step's batch (process {jax.process_index()}): "
      f"{None if ids is None else ids.tolist()}; losses at step {step - 1}: {losses}. "
      f"Training stopped; that update was not applied and no checkpoint after step "
      f"{good} was written (last good checkpoint: "
      f"{'none' if good is None else os.path.join(ckpt_dir, str(good))}). A lower LR, a "
      f"longer warmup (config.optim.warmup_steps) or config.optim.grad_clip_norm may help."
    )

  step = start_step
  if start_step == 0 and eval_every > 0 and config.eval.get("at_start", False):
    last_metrics = run_eval(state, 0)
  if missing_evaluation(config, curve, start_step, total_steps):
    _log(f"step {start_step}: its evaluation was interrupted; evaluating it now")
    last_metrics = run_eval(state, start_step)
  while step < total_steps:
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      t0 = time.perf_counter()
      try:
        batch = next(batches)
      except (stream.BadRecordError, trainer.DataStallError):
        saver.finish()  # the checkpoints written so far are complete when the run stops
        saver.close()
        raise
      data_wait += time.perf_counter() - t0
      image_ids.append((step, np.asarray(batch["image_id"]).copy()))
      state, metrics = train_step(state, trainer.to_global(batch, parts.batch_sharding))
    step += 1
    steps_in_interval += 1
    progress(step)
    is_last = step == total_steps
    preempted = watch.reached(step) and not is_last
    do_eval = eval_every > 0 and (step % eval_every == 0 or is_last) and not preempted
    do_eval = do_eval or (is_last and config.eval.get("at_end", True))
    do_ckpt = is_last or preempted or (ckpt_every > 0 and step % ckpt_every == 0)
    if step % log_every == 0 or is_last or do_ckpt or do_eval:
      m = trainer.check_finite(metrics, describe_bad_step)
      if step % log_every == 0 or is_last:
        elapsed = time.time() - t_interval
        scalars = {k: float(v) for k, v in m.items() if k != "bad_step"}
        scalars.update(
          {
            "images_seen": step * batch_size,
            "time/step_s": elapsed / steps_in_interval,
            "time/data_wait_s": data_wait / steps_in_interval,
            "time/data_wait_fraction": data_wait / max(elapsed, 1e-9),
          }
        )
        if hasattr(train_iter, "skipped_before"):  # this process's, data.skip_bad_records
          scalars["data/skipped_records"] = train_iter.skipped_before(step)
        writer.write_scalars(step, scalars)
        history.append(dict(step=step, **scalars))
        data_wait, t_interval, steps_in_interval = 0.0, time.time(), 0
    if do_ckpt:
      saver.save(step, state)
    if preempted:
      saved = saver.finish()
      _log(
        f"preemption (SIGTERM): every process stopped after step {step}; checkpoint "
        f"{os.path.join(ckpt_dir, str(saved))} written; the same command resumes from it"
      )
      break
    if do_eval:
      with progress.timed("eval"):
        last_metrics = run_eval(state, step)

  saver.finish()
  saver.close()
  if not last_metrics and curve:
    last_metrics = {
      k: v for k, v in curve[-1].items() if k not in ("step", "images_seen", "wall_s", "eval_s")
    }
  writer.flush()
  _log(f"done: step {step}, {(time.time() - t_start) / 60:.1f} min")
  return {
    "metrics": last_metrics,
    "curve": list(curve),
    "history": history,
    "step": step,
    "train_step_compilations": train_step._cache_size(),
    "preempted": watch.step is not None and step < total_steps,
  }  # pylint: disable=protected-access


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates a checkpoint on the recipe's evaluation split; writes workdir/EVAL_FILE.

  The checkpoint: the latest one in workdir/checkpoints, or, when there is none, the detector
  config.init_from_detector (loaded as a new run would load it; its class heads must fit the
  recipe). The model, state layout and predict are build_parts' (the training run's own).

  Returns and writes (process 0) {"checkpoint": path, "step": its step (null for a detector),
  "eval_split", "eval_s", "bbox/AP", "segm/AP", ... every COCO metric (null where undefined)}.
  """
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import recipe as data_recipe  # pylint: disable=g-import-not-at-top

  config = data_recipe.resolve_config(config)  # as the training run resolved it
  workdir = os.path.abspath(workdir)
  mesh = trainer.make_mesh()
  sched = optim.resolve_schedule(config.schedule, config.optim, int(config.batch_size))
  data = eval_data_config(config)
  # The padded shapes of every batch (train and eval alike) for build_parts.
  first = next(
    pipeline.make_eval_iterator(
      data,
      eval_batch_size(config) // jax.process_count(),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  )
  sample = init_batch(first)
  parts = build_parts(config, sched, mesh, sample)

  ckpt_dir = os.path.join(workdir, "checkpoints")
  state, step = None, None
  if os.path.isdir(ckpt_dir):
    state, step = restore_checkpoint(config, ckpt_dir, parts)
  if step is not None:
    source = os.path.join(ckpt_dir, str(step))
    if config.get("init_from_detector"):
      _log(f"{source} is evaluated; init_from_detector={config.init_from_detector} is ignored")
  elif config.get("init_from_detector"):
    report = warm_start.init_from_detector(
      config, parts, jax.random.PRNGKey(int(config.seed)), sample
    )
    if report["reinitialized"]:
      raise ValueError(
        f"init_from_detector={config.init_from_detector}: its class heads do not fit the "
        f"recipe's model.num_classes={config.model.num_classes}; evaluating freshly "
        "initialised heads measures nothing"
      )
    state, source = report["state"], os.path.abspath(config.init_from_detector)
  else:
    raise ValueError(
      f"nothing to evaluate: {ckpt_dir} holds no checkpoint and config.init_from_detector "
      "is not set"
    )

  _log(f"evaluating {source} on {data.name} {data.eval_split}")
  t0 = time.time()
  metrics = make_evaluator(config, parts)(trainer.variables_of(state))
  record = {
    "checkpoint": source,
    "step": step,
    "eval_split": data.eval_split,
    "eval_s": time.time() - t0,
    **{k: (None if np.isnan(v) else v) for k, v in metrics.items()},
  }
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.write_json(os.path.join(workdir, EVAL_FILE), record, indent=1)
  _log(
    f"COCO metrics of {source} ({os.path.join(workdir, EVAL_FILE)}):\n"
    + "\n".join(f"  {k:12s} {v:.3f}" for k, v in metrics.items())
  )
  return record


def _prepend(first: Any, rest: Iterator) -> Iterator:
  yield first
  yield from rest
