r"""Command-line entry point: train and evaluate one recipe, or evaluate a checkpoint only.

  python -m rethink_jax.main --config configs/FILE.py[:ARG] --workdir DIR [--config.a.b=value ...]
  python -m rethink_jax.main --config configs/FILE.py --workdir DIR --mode=eval \
      [--config.init_from_detector=DETECTOR_DIR]

--mode=eval evaluates the latest checkpoint in DIR (or, with none, the detector checkpoint
DETECTOR_DIR) on the recipe's evaluation split and writes the COCO metrics (bbox and segm) to
DIR/eval_metrics.json. Fine-tuning a whole detector: --config.init_from_detector=DETECTOR_DIR in
the default mode (class heads are re-initialised when the recipe's class count differs).

Examples:
  python -m rethink_jax.main --config configs/tiny_shapes.py:20 --workdir runs/tiny
  python -m rethink_jax.main --config configs/scratch_mask_rcnn_R_50_FPN_gn.py:3 \
      --workdir runs/scratch_3x --config.batch_size=64
  python -m rethink_jax.main --config configs/tiny_shapes.py:20 --workdir runs/tiny --mode=eval

Multi-host (TPU pod slices, SLURM, several GPU nodes): run the same command on every host.
rethink_jax.distributed.initialize() joins the hosts: through JAX's cluster detection (Cloud TPU
VMs, SLURM, Open MPI, Kubernetes), or explicitly with --coordinator_address=HOST:PORT
--num_processes=N --process_id=K elsewhere. Starting the command again with the same --workdir
resumes from the last checkpoint. Recipes import `from configs import common`: run from the
repository root or after `pip install -e .`.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "A recipe file configs/FILE.py[:ARG].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and curves.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval"],
  "train: train and evaluate (resuming from workdir); eval: evaluate workdir's latest "
  "checkpoint (or config.init_from_detector) and write workdir/eval_metrics.json.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (jax.distributed.initialize)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Before anything touches the backend (jax.devices(), the first jit): join the other hosts
  # (explicit flags / JAX_* env, or JAX's cluster detection; a no-op on one process).
  from rethink_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure()
  import jax  # pylint: disable=g-import-not-at-top

  from rethink_jax import distributed  # pylint: disable=g-import-not-at-top

  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from rethink_jax import train  # pylint: disable=g-import-not-at-top

  logging.info(
    "JAX process %d / %d, devices %s", jax.process_index(), jax.process_count(), jax.devices()
  )
  if _MODE.value == "eval":
    train.evaluate_only(_CONFIG.value, _WORKDIR.value)
  else:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
