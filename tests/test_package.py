"""Importing rethink_jax sets the XLA:CPU flag it documents, and leaves a user's choice alone."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PRINT_FLAGS = "import os, rethink_jax; print(os.environ.get('XLA_FLAGS', ''))"


def _flags_after_import(xla_flags):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", _PRINT_FLAGS], env=env, capture_output=True,
                       text=True, timeout=120, check=True)
  return out.stdout.strip()


def test_import_adds_the_cpu_flag_and_keeps_other_flags():
  import rethink_jax  # pylint: disable=g-import-not-at-top
  assert _flags_after_import(None) == rethink_jax._CPU_FLAG
  assert _flags_after_import("--xla_force_host_platform_device_count=8").split() == [
      "--xla_force_host_platform_device_count=8", rethink_jax._CPU_FLAG]


def test_a_users_ynn_setting_is_kept():
  mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
  assert _flags_after_import(mine) == mine
