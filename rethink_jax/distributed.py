"""Multi-host start-up: one call before anything touches the devices.

JAX runs one process per host (multi-controller): every host runs the same program, sees all the
devices of the job through jax.devices() and its own through jax.local_devices(), reads its own
shard of the data, and joins the collectives of every jitted step. The processes find each other
through jax.distributed.initialize(), which `initialize` below calls

  * with the coordinator given explicitly (flags --coordinator_address / --num_processes /
    --process_id of rethink_jax.main, or the environment variables JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID): any cluster, e.g. several GPU nodes without a launcher;
  * otherwise without arguments, so that JAX's own cluster detection finds the job: SLURM (srun),
    Cloud TPU VMs and GKE (the slice from the TPU metadata, the same command on every worker),
    Open MPI, Kubernetes;

and does nothing on a single process (a laptop, one GPU box, CI: JAX detects no cluster).
Afterwards:

  from rethink_jax import distributed
  info = distributed.initialize()          # {"mode", "process_index", "process_count"}
  if distributed.is_main_process(): ...    # only process 0 writes files meant for people
  distributed.sync("after-eval")           # a barrier across every process

Processes on CPU (tests: several processes on one machine) exchange data through gloo, JAX's
default CPU collectives ("jax_cpu_collectives_implementation").
"""

import os
from typing import Optional

from absl import logging

_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, "").strip()
  return int(value) if value else None


def initialize(
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
  *,
  auto: bool = True,
  initialization_timeout: int = 300,
) -> dict:
  """Joins this process to the job (jax.distributed.initialize) when there is a job to join.

  Call it first, before jax.devices(), the first jit or anything else that starts a backend.

  Args:
    coordinator_address: "host:port" of process 0 (any free port there); with num_processes
      and process_id (all three, or none). Defaults: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
      JAX_PROCESS_ID from the environment.
    num_processes: number of processes of the job (usually one per host).
    process_id: this process's index, 0..num_processes-1; process 0 hosts the coordinator.
    auto: without a coordinator, let JAX's cluster detection find the job (SLURM, Cloud TPU,
      Open MPI, Kubernetes); a single process when it finds none.
    initialization_timeout: seconds to wait for every process to join.
  Returns:
    {"mode": "explicit" | "auto" | "already" | "single",
     "process_index": int, "process_count": int}.
  Raises:
    ValueError: a coordinator without num_processes / process_id, or an id out of range.
  """
  import jax  # pylint: disable=g-import-not-at-top

  coordinator_address = coordinator_address or os.environ.get(_ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _env_int(_ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(_ENV_PROCESS_ID)

  if jax.distributed.is_initialized():
    mode = "already"
  elif coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError(
        f"coordinator_address={coordinator_address!r} needs num_processes and process_id "
        f"(got {num_processes}, {process_id}); set --num_processes and --process_id"
      )
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} not in [0, num_processes={num_processes})")
    mode = "explicit"
    if num_processes > 1:
      jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
      )
    else:
      mode = "single"
  elif (num_processes or 1) > 1:
    raise ValueError(
      f"num_processes={num_processes} needs a coordinator_address (host:port of process 0)"
    )
  elif auto and _join_detected_cluster(initialization_timeout):
    mode = "auto"
  else:
    mode = "single"
  info = dict(mode=mode, process_index=jax.process_index(), process_count=jax.process_count())
  if (
    mode not in ("single", "already")
    and jax.process_count() > 1
    and (jax.default_backend() == "cpu")
  ):
    _warm_up_cpu_collectives()
  logging.info("distributed: %s", info)
  return info


def _join_detected_cluster(initialization_timeout: int) -> bool:
  """jax.distributed.initialize() with JAX's cluster detection; False when it finds no cluster."""
  import jax  # pylint: disable=g-import-not-at-top

  try:
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
  except ValueError as e:
    # Nothing detected: JAX names the argument it could not fill ("... should be defined").
    if "defined" not in str(e) or jax.distributed.is_initialized():
      raise
    return False
  return True


def _warm_up_cpu_collectives(timeout_s: int = 600) -> None:
  """Creates the gloo communicators while every process is in step.

  Over gloo (CPU) a process gets only 30 s to join a new communicator: the first collective of a
  group of devices fails when another process reaches it later than that (still compiling, still
  writing files, or just starved on a busy machine). Communicators are cached per group of
  devices and reused by every later program, so this runs the two groups the trainer uses (all
  devices: the step's all-reduce; one device per process: barriers and host gathers) right away,
  each compiled first and started after a barrier of the coordination service (which waits as
  long as `timeout_s`), so that arrival skew later on is harmless.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top

  # The coordination service's barrier (not a collective: those are what is being set up here).
  barrier = multihost.get_barrier_sync_fn()
  firsts = [
    min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
    for p in range(jax.process_count())
  ]
  for i, devices in enumerate((jax.devices(), firsts)):
    mesh = Mesh(np.asarray(devices), ("d",))
    mine = [d for d in devices if d.process_index == jax.process_index()]
    x = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P("d")), np.ones((len(mine),), np.float32), (len(devices),)
    )
    total = jax.jit(lambda v: v.sum(), out_shardings=NamedSharding(mesh, P())).lower(x).compile()
    barrier(key=f"rethink_jax_warm_up_{i}", timeout_ms=timeout_s * 1000)
    got = int(np.asarray(total(x)))
    if got != len(devices):
      raise RuntimeError(f"all-reduce over {len(devices)} devices gave {got}")


def is_main_process() -> bool:
  """True on process 0: the one that writes logs, curves and reports for people to read."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier: returns once every process got here (a no-op on one process)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def free_port() -> int:
  """A free TCP port on this machine (for a local coordinator in tests and demos)."""
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
