"""Importing rethink_jax changes nothing; runtime.configure() adds the XLA:CPU flag it documents
and leaves a user's own choice alone; the installed package holds every module and the recipes."""

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


def test_the_package_holds_every_module_and_the_recipes():
  """pyproject.toml's package list finds every directory of Python files the code imports."""
  import tomllib  # pylint: disable=g-import-not-at-top

  import setuptools  # pylint: disable=g-import-not-at-top

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
  found = set(setuptools.find_packages(ROOT, include=find["include"]))
  expected = {"configs"}
  for top in ("rethink_jax",):
    for d, _, names in os.walk(os.path.join(ROOT, top)):
      if any(n.endswith(".py") for n in names):
        expected.add(os.path.relpath(d, ROOT).replace(os.sep, "."))
  assert found == expected, found ^ expected


def test_the_package_data_holds_the_sources_read_at_run_time():
  """Files other than Python under rethink_jax (the oneDNN custom calls' C++) ship as data."""
  import fnmatch  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
  sources = []
  for d, _, names in os.walk(os.path.join(ROOT, "rethink_jax")):
    package = os.path.relpath(d, ROOT).replace(os.sep, ".")
    sources += [(package, n) for n in names if n.endswith((".cc", ".h"))]
  assert ("rethink_jax.ops", "onednn_conv.cc") in sources
  for package, name in sources:
    assert any(fnmatch.fnmatch(name, p) for p in package_data.get(package, [])), (package, name)
