"""The training skeleton every task shares (detection in train.py, classification in pretrain.py).

One program for one CPU, a GPU box or a TPU pod slice:
  * a Mesh over all devices with one axis "data": each global batch is sharded on it, parameters
    and optimizer state are replicated (SyncBN's statistics then cover the whole global batch);
  * host batches become global arrays with jax.make_array_from_process_local_data (`to_global`),
    and per-row outputs come back as this process's rows (`local_rows`);
  * the train state {"step", "rng", "params", "opt_state", "collections", "bad_step"};
  * one train step: value_and_grad of the task's loss, the optax update, and a finite check that
    leaves the state unchanged and records the first bad step in state["bad_step"] (read by the
    host with the metrics it fetches anyway: no host round trip inside the step);
  * `build(...)`: the task's model, optimizer, abstract state, shardings and the jitted init,
    train step (state donated) and predict, the one construction every user of a step goes
    through (training, benchmarks, ahead-of-time TPU compilation);
  * `with_timeout(batches, timeout_s)`: the host batches read one ahead by a thread, so that a
    stalled input pipeline stops the run with an error instead of hanging it.

A task supplies three functions of its model:
  init_variables(model, rngs, batch) -> variables {"params", other collections};
  loss_fn(model, params, collections, batch, rng) -> (loss, (metrics, updated collections));
  predict(model, variables, batch) -> {name: (B, ...) per-row outputs}.
"""

from collections.abc import Callable, Iterator, Sequence
import functools
import queue
import threading
import time
import types
from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

DATA_AXIS = "data"


class NonFiniteLossError(FloatingPointError):
  """A train step produced a non-finite loss or gradient; the run stops, state not saved."""


def log(msg: str, task: str = "train") -> None:
  """Process 0 prints `msg` (with the task and the time); every process logs it."""
  logging.info(msg)
  if jax.process_index() == 0:
    print(f"[{task} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Mesh and global batches.
# ------------------------------------------------------------------------------------------------
def make_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def to_global(batch: dict, sharding: NamedSharding) -> dict:
  """Host-local numpy batch {k: (b, ...)} -> global jax.Arrays {k: (b * process_count, ...)}
  sharded on the batch axis. Every process passes its own b rows (the same b everywhere)."""
  n = jax.process_count()

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n,) + x.shape[1:])

  return {k: one(v) for k, v in batch.items()}


def local_rows(x: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded global array that this process fed in (in its local order)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:  # replicas of the same rows on several local devices
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


# ------------------------------------------------------------------------------------------------
# State and steps.
# ------------------------------------------------------------------------------------------------
def make_init_fn(
  init_variables: Callable, tx: optax.GradientTransformation, init_rngs: Sequence[str] = ("params",)
) -> Callable:
  """rng (PRNG key), sample batch -> the train state:
  {"step": int32, "rng": key, "params", "opt_state", "collections": {batch_stats, frozen, ...},
   "bad_step": int32 (-1: every step so far was finite)}.

  init_variables(rngs {name: key for name in init_rngs}, batch) -> variables; the rng is split
  into one key per name in `init_rngs` and the run's train rng (the last key).
  """

  def init(rng, batch):
    *keys, train_rng = jax.random.split(rng, len(init_rngs) + 1)
    variables = flax.core.unfreeze(init_variables(dict(zip(init_rngs, keys)), batch))
    params = variables.pop("params")
    return dict(
      step=jnp.zeros((), jnp.int32),
      rng=train_rng,
      params=params,
      opt_state=tx.init(params),
      collections=variables,
      bad_step=jnp.full((), -1, jnp.int32),
    )

  return init


def make_train_step(
  loss_fn: Callable, tx: optax.GradientTransformation, lr_fn: Callable
) -> Callable:
  """(state, global batch) -> (new state, metrics). Pure; jit it with shardings (`build`).

  loss_fn(params, collections, batch, rng) -> (float32 loss, (metrics, updated collections)).
  The step's rng is the run's rng folded with the step (the same on every process: the step is
  one global computation). A non-finite loss or gradient norm leaves params / optimizer state /
  collections unchanged and records the step in state["bad_step"] (sticky: no later update is
  applied either). Metrics: the task's, total_loss, grad_norm, lr, param_norm, bad_step.
  """

  def step_fn(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(state["rng"], step)
    collections = state["collections"]
    (total, (metrics, new_coll)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"], collections, batch, rng
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    ok = finite & (state["bad_step"] < 0)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_collections = dict(collections, **flax.core.unfreeze(new_coll))
    new_state = dict(
      step=step + 1,
      rng=state["rng"],
      params=keep(params, state["params"]),
      opt_state=keep(opt_state, state["opt_state"]),
      collections=keep(new_collections, collections),
      bad_step=jnp.where(~finite & (state["bad_step"] < 0), step, state["bad_step"]),
    )
    metrics = dict(
      metrics,
      total_loss=total,
      grad_norm=grad_norm,
      lr=lr_fn(step),
      param_norm=optax.global_norm(new_state["params"]),
      bad_step=new_state["bad_step"],
    )
    return new_state, metrics

  return step_fn


def build(
  model: Any,
  mesh: Mesh,
  sample: dict,
  *,
  init_variables: Callable,
  loss_fn: Callable,
  make_optimizer: Callable,
  predict: Optional[Callable] = None,
  init_rngs: Sequence[str] = ("params",),
) -> types.SimpleNamespace:
  """A task's model, optimizer, state layout, shardings and jitted functions on `mesh`.

  Args:
    model: the task's Flax module.
    mesh: make_mesh(...)'s mesh (its devices may be compile-only, e.g. a TPU topology's).
    sample: a batch {k: (b, ...)} (arrays or ShapeDtypeStructs) with the shapes init sees.
    init_variables, loss_fn, predict: the task's functions (module docstring), model first.
    make_optimizer: param shapes -> (optax transformation, lr_fn(step) -> LR).
    init_rngs: the rng streams init_variables needs.

  Returns a SimpleNamespace: model, tx, lr_fn, mesh, replicated and batch_sharding
  (NamedShardings), abstract_state, state_sharding (replicated), init (jitted: rng, sample ->
  state), train_step (jitted: state, global batch -> state, metrics; donates the state),
  predict (jitted: variables, global batch -> batch-sharded outputs) and predict_fn
  (variables, host batch -> this process's rows of the outputs as numpy).
  """
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
  init_vars = functools.partial(init_variables, model)
  rng = jax.random.PRNGKey(0)
  param_shapes = jax.eval_shape(
    lambda r, b: init_vars({name: r for name in init_rngs}, b)["params"], rng, sample
  )
  tx, lr_fn = make_optimizer(param_shapes)
  init_fn = make_init_fn(init_vars, tx, init_rngs)
  abstract_state = jax.eval_shape(init_fn, rng, sample)
  state_sharding = jax.tree_util.tree_map(lambda _: replicated, abstract_state)
  train_step = jax.jit(
    make_train_step(functools.partial(loss_fn, model), tx, lr_fn),
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, replicated),
    donate_argnums=(0,),
  )
  parts = types.SimpleNamespace(
    model=model,
    tx=tx,
    lr_fn=lr_fn,
    mesh=mesh,
    replicated=replicated,
    batch_sharding=batch_sharding,
    abstract_state=abstract_state,
    state_sharding=state_sharding,
    init=jax.jit(init_fn, out_shardings=state_sharding),
    train_step=train_step,
    predict=None,
    predict_fn=None,
  )
  if predict is not None:
    parts.predict = jax.jit(
      functools.partial(predict, model),
      in_shardings=(replicated, batch_sharding),
      out_shardings=batch_sharding,
    )

    def predict_fn(variables, batch):
      out = parts.predict(variables, to_global(batch, batch_sharding))
      return {k: local_rows(v) for k, v in out.items()}

    parts.predict_fn = predict_fn
  return parts


def abstract_state_with_shardings(parts: types.SimpleNamespace) -> Any:
  """parts.abstract_state as ShapeDtypeStructs carrying parts.state_sharding (a restore target,
  or the state argument of an ahead-of-time lowering)."""
  return jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    parts.abstract_state,
    parts.state_sharding,
  )


def variables_of(state: dict) -> dict:
  """The model variables {"params", collections...} of a train state (for predict)."""
  return {"params": state["params"], **state["collections"]}


# ------------------------------------------------------------------------------------------------
# Loop helpers.
# ------------------------------------------------------------------------------------------------
def check_finite(metrics: dict, describe: Callable[[int, dict], str]) -> dict:
  """The host copy of a step's metrics; raises NonFiniteLossError when a step so far was not
  finite. describe(bad step, host metrics) -> the error message (and the task's clean-up)."""
  m = jax.device_get(metrics)
  bad = int(m["bad_step"])
  if bad >= 0:
    raise NonFiniteLossError(describe(bad, m))
  return m


class DataStallError(TimeoutError):
  """The input pipeline gave no batch for longer than the configured timeout."""


def with_timeout(batches: Iterator, timeout_s: float, start_step: int = 0) -> Iterator:
  """`batches`, read one ahead by a thread; raises DataStallError naming the step when the next
  batch takes longer than `timeout_s` seconds (0: wait forever, no thread). Errors of the
  pipeline are raised here, in the caller's thread."""
  if timeout_s <= 0:
    yield from batches
    return
  items: queue.Queue = queue.Queue(maxsize=1)
  stop = threading.Event()

  def produce():
    try:
      for item in batches:
        while not stop.is_set():
          try:
            items.put((True, item), timeout=1.0)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      items.put((False, StopIteration()))
    except BaseException as e:  # pylint: disable=broad-except
      items.put((False, e))

  threading.Thread(target=produce, daemon=True, name="train_batches").start()
  step = start_step
  try:
    while True:
      try:
        ok, item = items.get(timeout=timeout_s)
      except queue.Empty:
        raise DataStallError(
          f"the training data gave no batch for {timeout_s:g} s at step {step} (process "
          f"{jax.process_index()}): the input pipeline or its storage stalls. Training stopped; "
          f"the last checkpoint is intact (config.data_timeout_s sets the limit)."
        ) from None
      if not ok:
        if isinstance(item, StopIteration):
          return
        raise item
      yield item
      step += 1
  finally:
    stop.set()
