"""oneDNN's convolution primitives as XLA:CPU custom calls (jax.ffi).

XLA:CPU runs a dense conv 1.2 to 2.8 times slower than oneDNN, forward and backward, and a
grouped one (ResNeXt's) three to eight times (docs/performance.md). onednn_conv.cc wraps oneDNN's
forward, input-gradient and kernel-gradient primitives as XLA FFI handlers; `conv2d` here calls
them, with its gradient written out as the other two. It is xla_cpu.conv2d's CPU form for every
float32 conv but 1x1 ones in single-device programs (XLA's SPMD partitioner does not split a
custom call: it would gather a sharded batch onto every device), and is tested against
xla_cpu.conv2d_reference (tests/ops/test_onednn.py).

The handlers are compiled on first use (a few seconds) with the C++ compiler on PATH (or $CXX)
against the headers of jaxlib and of the `onednn-devel-cpu-gomp` wheel, into
$RETHINK_JAX_BUILD_DIR (default ~/.cache/rethink_jax), once per source and jaxlib version. Where
that cannot be done (no compiler, no oneDNN wheel) or RETHINK_JAX_ONEDNN=0 is set, `available()`
is False, says why once in the log, and xla_cpu uses its XLA forms instead.
"""

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {
  "forward": "RethinkConvForward",
  "input_gradient": "RethinkConvInputGradient",
  "kernel_gradient": "RethinkConvKernelGradient",
}


def _prefix_paths() -> tuple[pathlib.Path, pathlib.Path]:
  """The oneDNN wheel's include and lib folders (wheels put their data under sys.prefix)."""
  prefix = pathlib.Path(sys.prefix)
  return prefix / "include", prefix / "lib"


def _build(build_dir: pathlib.Path) -> pathlib.Path:
  """Compiles onednn_conv.cc into build_dir (atomically) unless built already; returns the .so."""
  include, lib = _prefix_paths()
  if not (include / "oneapi" / "dnnl" / "dnnl.hpp").exists() or not (lib / "libdnnl.so").exists():
    raise FileNotFoundError(
      f"oneDNN headers or library not under {sys.prefix} (onednn-devel wheel)"
    )
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise FileNotFoundError("no C++ compiler on PATH (set CXX)")
  source = _SOURCE.read_bytes()
  tag = hashlib.sha256(source + jax.ffi.include_dir().encode() + str(lib).encode()).hexdigest()[:16]
  library = build_dir / f"onednn_conv_{tag}.so"
  if library.exists():
    return library
  build_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=build_dir) as scratch:
    partial = pathlib.Path(scratch) / library.name
    command = [
      compiler,
      "-O2",
      "-std=c++17",
      "-shared",
      "-fPIC",
      "-fopenmp",
      "-w",
      f"-I{jax.ffi.include_dir()}",
      f"-I{include}",
      str(_SOURCE),
      f"-L{lib}",
      "-ldnnl",
      f"-Wl,-rpath,{lib}",
      "-o",
      str(partial),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{result.stderr[-2000:]}")
    os.replace(partial, library)  # another process may have built it meanwhile: same bytes
  return library


def _build_dir() -> pathlib.Path:
  """$RETHINK_JAX_BUILD_DIR, else ~/.cache/rethink_jax, else (not writable) one under /tmp."""
  if "RETHINK_JAX_BUILD_DIR" in os.environ:
    return pathlib.Path(os.environ["RETHINK_JAX_BUILD_DIR"])
  cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
  try:
    (cache / "rethink_jax").mkdir(parents=True, exist_ok=True)
    return cache / "rethink_jax"
  except OSError:
    return pathlib.Path(tempfile.gettempdir()) / f"rethink_jax-{os.getuid()}"


@functools.cache
def _load() -> Optional[str]:
  """Builds and registers the handlers once; None when ready, else the reason they are not."""
  if os.environ.get("RETHINK_JAX_ONEDNN", "1") == "0":
    return "RETHINK_JAX_ONEDNN=0"
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(_build_dir())))
  except (OSError, RuntimeError) as e:
    logging.warning("oneDNN convolutions unavailable, using XLA's: %s", e)
    return str(e)
  for kind, symbol in _TARGETS.items():
    handler = jax.ffi.pycapsule(getattr(library, symbol))
    jax.ffi.register_ffi_target(f"rethink_conv_{kind}", handler, platform="cpu")
  return None


def available() -> bool:
  """Whether the oneDNN custom calls are built and registered (builds them on first call)."""
  return _load() is None


def _call(kind: str, out_shape: tuple[int, ...], a: Array, b: Array, attributes: dict) -> Array:
  call = jax.ffi.ffi_call(
    f"rethink_conv_{kind}",
    jax.ShapeDtypeStruct(out_shape, jnp.float32),
    vmap_method="sequential",
  )
  return call(a, b, **{k: np.int64(v) for k, v in attributes.items()})


def _attributes(strides, padding, dilation, groups) -> dict:
  return dict(
    stride_h=strides[0],
    stride_w=strides[1],
    pad_h=padding[0],
    pad_w=padding[1],
    dilation_h=dilation[0],
    dilation_w=dilation[1],
    groups=groups,
  )


def _output_shape(x_shape, kernel_shape, strides, padding, dilation) -> tuple[int, ...]:
  b, h, w, _ = x_shape
  kh, kw, _, o = kernel_shape
  oh = (h + 2 * padding[0] - (kh - 1) * dilation[0] - 1) // strides[0] + 1
  ow = (w + 2 * padding[1] - (kw - 1) * dilation[1] - 1) // strides[1] + 1
  return (b, oh, ow, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d(
  x: Array,
  kernel: Array,
  strides: tuple[int, int],
  padding: tuple[int, int],
  dilation: tuple[int, int],
  groups: int,
) -> Array:
  """x (B, H, W, I) * kernel (kh, kw, I / groups, O) -> (B, H', W', O), float32, symmetric
  padding, as xla_cpu.conv2d_reference; needs available()."""
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[3] != kernel.shape[2] * groups:
    raise ValueError(f"conv2d: x {x.shape} and kernel {kernel.shape} with {groups} groups")
  if kernel.shape[3] % groups or x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise ValueError(
      f"conv2d: {kernel.shape[3]} outputs, {groups} groups, {x.dtype}, {kernel.dtype}"
    )
  if not available():
    raise RuntimeError(f"oneDNN convolutions unavailable: {_load()}")
  shape = _output_shape(x.shape, kernel.shape, strides, padding, dilation)
  return _call("forward", shape, x, kernel, _attributes(strides, padding, dilation, groups))


def _conv2d_fwd(x, kernel, strides, padding, dilation, groups):
  return conv2d(x, kernel, strides, padding, dilation, groups), (x, kernel)


def _conv2d_bwd(strides, padding, dilation, groups, residuals, dy):
  x, kernel = residuals
  attributes = _attributes(strides, padding, dilation, groups)
  dy = dy.astype(jnp.float32)
  dx = _call("input_gradient", x.shape, dy, kernel, attributes)
  dk = _call("kernel_gradient", kernel.shape, x, dy, attributes)
  return dx, dk


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
