"""rethink_jax: Mask R-CNN with ResNet-FPN-GN in JAX/Flax, trained from scratch or fine-tuned.

A reimplementation of "Rethinking ImageNet Pre-training" (He, Girshick, Dollar, ICCV 2019).
Subpackages: ops (pure detection ops), models (Flax modules), data (tfds builders and the input
pipeline); modules: train, evaluate, optim, convert, compare.

Importing the package adds one XLA:CPU flag to XLA_FLAGS (see `_add_cpu_flags`); it only takes
effect when the package is imported before JAX starts its backends.
"""
import os

# XLA:CPU of jaxlib 0.10.2 routes convolutions into YNNPACK fusions by default. Without them the
# R50-FPN-GN Mask R-CNN train step at 512 x 512, batch 2, runs 1.8x faster (scripts/
# benchmark_model.py on 2 cores: 30.2 -> 16.6 s), because a 3x3 conv's backward on the heads'
# shapes is 2.4x faster outside YNNPACK (2.45 -> 1.03 s for 1024 ROIs at 7 x 7, torch 0.98 s).
# The flag touches only the CPU backend. Other jaxlib versions may not know the flag (XLA aborts
# on unknown flags), so it is added only for the version it was measured on.
_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
_CPU_FLAG_JAXLIB = ("0.10.2",)


def _add_cpu_flags() -> None:
  """Appends _CPU_FLAG to XLA_FLAGS unless the user already chose a YNN fusion setting."""
  try:
    from jaxlib import version as jaxlib_version  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if jaxlib_version.__version__ in _CPU_FLAG_JAXLIB and "ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_CPU_FLAG}".strip()


_add_cpu_flags()
