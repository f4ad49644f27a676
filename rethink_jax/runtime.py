"""Process set-up for the entry points (main, compare, pretrain, scripts): `configure()`.

Importing rethink_jax changes nothing in the process. Entry points call `configure()` once, before
JAX starts its backends, to apply the settings this project runs best with:
  * XLA:CPU without YNNPACK fusions (jaxlib 0.10.2 routes convolutions into them by default and runs
    the model's conv gradients several times slower there; docs/performance.md has the figures).
    Added to XLA_FLAGS only when the user's XLA_FLAGS name no YNN fusion setting, and only for the
    jaxlib versions it was measured on (XLA aborts on flags it does not know).
  * TensorFlow (only the input pipeline uses it) sees no GPU, so it never takes memory from JAX.
"""

import os

CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
_CPU_FLAG_JAXLIB = ("0.10.2",)


def xla_flags_with_cpu_flag(flags: str, jaxlib_version: str) -> str:
  """`flags` (an XLA_FLAGS value) with CPU_FLAG appended, unless the user chose a YNN setting."""
  if jaxlib_version not in _CPU_FLAG_JAXLIB or "ynn_fusion_type" in flags:
    return flags
  return f"{flags} {CPU_FLAG}".strip()


def configure(hide_gpus_from_tf: bool = True) -> None:
  """Applies the XLA:CPU flag to this process's XLA_FLAGS and hides GPUs from TensorFlow.

  The flag takes effect only if JAX has not started a backend yet: call this first in `main`.
  """
  from jaxlib import version  # pylint: disable=g-import-not-at-top

  os.environ["XLA_FLAGS"] = xla_flags_with_cpu_flag(
    os.environ.get("XLA_FLAGS", ""), version.__version__
  )
  if hide_gpus_from_tf:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices: they were configured before.
      pass
