"""Importing rethink_jax changes nothing; runtime.configure() adds the XLA:CPU flag it documents
and leaves a user's own choice alone."""

import os
import subprocess
import sys

from rethink_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags_after(code, xla_flags):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run(
    [sys.executable, "-c", code + "; print(os.environ.get('XLA_FLAGS', ''))"],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  return out.stdout.strip()


def test_import_has_no_side_effects():
  assert _flags_after("import os, rethink_jax, rethink_jax.models, rethink_jax.train", None) == ""
  mine = "--xla_force_host_platform_device_count=8"
  assert _flags_after("import os, rethink_jax, rethink_jax.data.pipeline", mine) == mine


def test_configure_adds_the_cpu_flag_and_keeps_other_flags():
  code = "import os; from rethink_jax import runtime; runtime.configure(hide_gpus_from_tf=False)"
  assert _flags_after(code, None) == runtime.CPU_FLAG
  assert _flags_after(code, "--xla_force_host_platform_device_count=8").split() == [
    "--xla_force_host_platform_device_count=8",
    runtime.CPU_FLAG,
  ]
  mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
  assert _flags_after(code, mine) == mine


def test_the_flag_is_added_only_for_the_measured_jaxlib():
  assert runtime.xla_flags_with_cpu_flag("", "0.10.2") == runtime.CPU_FLAG
  assert runtime.xla_flags_with_cpu_flag("--a=1", "9.9.9") == "--a=1"
