"""Reads pickled weight files (Caffe2 Detectron, Detectron2 .pkl) without running code from them.

  tree = read_weight_pickle("R-50-GN.pkl")  # dicts, lists, tuples, str, numbers, numpy arrays

`pickle.load` calls whatever callable a file names (GLOBAL + REDUCE), so a crafted .pkl runs code
while it is read. Here `find_class` is the only way a file reaches a callable, and it opens onto
ALLOWED_GLOBALS alone: this module's functions that rebuild what NumPy pickles hold (arrays,
scalars, dtypes; NumPy 1.x and 2.x module paths; Python 2 pickles, read with encoding latin1)
from checked plain data. They hand the unpickler placeholders, never NumPy objects, so NumPy's own
__setstate__ (the BUILD opcode) never sees the file's bytes: a placeholder's __setstate__ checks
the state, builds the array itself, and the placeholders are swapped for their values at the end.
Everything else (os.system, eval, any other class, object or structured dtypes, persistent ids)
is refused before it is called, with UnsafePickleError naming what the file asked for.
"""

from collections.abc import Callable
import math
import pickle
import re
from typing import Any, BinaryIO, Optional

import numpy as np

# Kinds of array a weight file may hold: bool, ints, floats, complex, fixed-width bytes / unicode.
WEIGHT_DTYPE_KINDS = "biufcSU"
_DTYPE_CODE = re.compile(r"[<>=|]?[A-Za-z?][0-9]{0,6}")  # 'f4', '<i8', 'b', '?', 'U20'
# dtype flags that mark Python-object items (NPY_ITEM_REFCOUNT, LIST_PICKLE, IS_POINTER,
# NEEDS_PYAPI): a BUILD that sets them on a numeric dtype would make NumPy read bytes as pointers.
_OBJECT_FLAGS = 0x01 | 0x02 | 0x04 | 0x10
_MAX_NDIM = 32
WHAT_IS_ALLOWED = (
  "a weight pickle may hold only dicts, lists, tuples, strings, numbers and NumPy "
  "arrays of numbers, bools or fixed-width strings"
)


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle asks for something no plain weight file holds; raised before it is called."""


def _refuse(what: str) -> UnsafePickleError:
  return UnsafePickleError(
    f"{what}: not a plain weight file ({WHAT_IS_ALLOWED}); refused, nothing it names was run"
  )


def _short(x: Any) -> str:
  r = repr(x)
  return r if len(r) <= 80 else r[:77] + "..."


# --------------------------------------------------------------------------------------------
# Placeholders: what the allowed callables return to the unpickler.
# --------------------------------------------------------------------------------------------


class _Dtype:
  """numpy.dtype(code) from the file; its BUILD state may set the byte order, nothing else."""

  __slots__ = ("value",)

  def __init__(self, value: np.dtype):
    self.value = value

  def __setstate__(self, state: Any) -> None:
    self.value = _dtype_with_state(self.value, state)


class _Array:
  """_reconstruct(numpy.ndarray, ...) from the file; its BUILD state brings shape, dtype, bytes."""

  __slots__ = ("value",)

  def __init__(self):
    self.value: Optional[np.ndarray] = None

  def __setstate__(self, state: Any) -> None:
    if self.value is not None:
      raise _refuse("a second BUILD on one numpy array")
    self.value = _array_from_state(state)


class _Built:
  """An array or scalar this module built in full from a call in the file."""

  __slots__ = ("value",)

  def __init__(self, value: Any):
    self.value = value

  def __setstate__(self, state: Any) -> None:
    raise _refuse(f"BUILD on a finished numpy {type(self.value).__name__} ({_short(state)})")


class _Global:
  """What find_class hands out: calls `build`. BUILD on it is refused (on a plain function it
  would set attributes such as __defaults__, changing later loads)."""

  __slots__ = ("name", "build")

  def __init__(self, name: str, build: Callable[..., Any]):
    self.name, self.build = name, build

  def __call__(self, *args: Any) -> Any:
    return self.build(*args)

  def __setstate__(self, state: Any) -> None:
    raise _refuse(f"BUILD on {self.name} ({_short(state)})")

  def __repr__(self) -> str:
    return self.name


def _ndarray_called(*args: Any) -> None:
  raise _refuse(f"numpy.ndarray{_short(args)} called directly")


# numpy.ndarray: a weight pickle names it only as _reconstruct's first argument.
_NDARRAY = _Global("numpy.ndarray", _ndarray_called)


# --------------------------------------------------------------------------------------------
# Checks of the plain data the file passes.
# --------------------------------------------------------------------------------------------


def _weight_dtype(code: Any) -> np.dtype:
  """A dtype code ('f4', b'b', '<U20') -> np.dtype, refusing object, structured and odd kinds."""
  if isinstance(code, _Dtype):
    return code.value
  if isinstance(code, bytes):
    code = code.decode("latin1")
  if not isinstance(code, str) or not _DTYPE_CODE.fullmatch(code):
    raise _refuse(f"numpy.dtype({_short(code)})")
  try:
    dtype = np.dtype(code)
  except (TypeError, ValueError) as e:
    raise _refuse(f"numpy.dtype({code!r}) ({e})") from None
  if dtype.hasobject:
    raise _refuse(f"numpy.dtype({code!r}) is an object dtype (its items are any Python objects)")
  if dtype.kind not in WEIGHT_DTYPE_KINDS or dtype.fields is not None or dtype.itemsize == 0:
    kind = {"V": "structured or void", "M": "datetime", "m": "timedelta"}.get(dtype.kind, "")
    raise _refuse(f"numpy.dtype({code!r}) is a {kind or dtype.kind!r} dtype, not a weight dtype")
  return dtype


def _dtype_with_state(dtype: np.dtype, state: Any) -> np.dtype:
  """Applies a dtype's pickled state (3, endian, None, None, None, elsize, alignment, flags)."""
  if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
    raise _refuse(f"dtype state {_short(state)}")
  _, endian, subarray, names, fields, elsize, _, flags = state[:8]
  metadata = state[8] if len(state) == 9 else None
  if subarray is not None or names is not None or fields is not None:
    raise _refuse(f"a structured or sub-array dtype (state {_short(state)})")
  if metadata not in (None, {}):
    raise _refuse(f"dtype metadata {_short(metadata)}")
  if endian not in ("<", ">", "=", "|"):
    raise _refuse(f"dtype byte order {_short(endian)}")
  if type(elsize) is not int or elsize not in (-1, dtype.itemsize):
    raise _refuse(f"dtype {dtype.str} with item size {_short(elsize)}")
  if type(flags) is not int or flags & _OBJECT_FLAGS:
    raise _refuse(f"dtype {dtype.str} with object flags {_short(flags)}")
  return dtype.newbyteorder(endian) if endian in "<>" else dtype


def _shape(shape: Any) -> tuple[int, ...]:
  if not (
    isinstance(shape, tuple)
    and len(shape) <= _MAX_NDIM
    and all(type(n) is int and n >= 0 for n in shape)
  ):
    raise _refuse(f"array shape {_short(shape)}")
  return shape


def _raw_bytes(data: Any) -> bytes:
  """Array bytes: bytes (Python 3), bytearray (protocol 5) or a latin1 str (Python 2 pickles)."""
  if isinstance(data, (bytes, bytearray)):
    return bytes(data)
  if isinstance(data, str):
    return data.encode("latin1")
  raise _refuse(f"array data of type {type(data).__name__} (an object array's items?)")


def _array(raw: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
  """A fresh array from checked bytes, dtype and shape; order 'C' or 'F' is the bytes' layout."""
  if not isinstance(dtype, _Dtype):
    raise _refuse(f"array dtype {_short(dtype)}")
  dtype, shape, raw = dtype.value, _shape(shape), _raw_bytes(raw)
  count = math.prod(shape)
  if len(raw) != count * dtype.itemsize:
    raise _refuse(f"array of shape {shape} and dtype {dtype.str} with {len(raw)} bytes")
  flat = np.frombuffer(raw, dtype=dtype, count=count)
  return np.array(flat.reshape(shape, order=order), copy=True, order=order)


def _array_from_state(state: Any) -> np.ndarray:
  """ndarray's pickled state ([1,] shape, dtype, is_fortran, bytes) -> np.ndarray."""
  if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
    state = state[1:]
  if not (isinstance(state, tuple) and len(state) == 4):
    raise _refuse(f"array state {_short(state)}")
  shape, dtype, fortran, raw = state
  if fortran not in (0, 1) or type(fortran) not in (bool, int):
    raise _refuse(f"array order flag {_short(fortran)}")
  return _array(raw, dtype, shape, "F" if fortran else "C")


# --------------------------------------------------------------------------------------------
# The allowed callables.
# --------------------------------------------------------------------------------------------


def _reconstruct(subtype: Any, shape: Any, code: Any) -> _Array:
  """numpy's _reconstruct(ndarray, (0,), b'b'): an empty array that BUILD then fills."""
  if subtype is not _NDARRAY:
    raise _refuse(f"_reconstruct of {_short(subtype)} (only numpy.ndarray)")
  _shape(shape)
  _weight_dtype(code)
  return _Array()


def _scalar(dtype: Any, data: Any) -> _Built:
  """numpy's scalar(dtype, bytes): one item of a weight dtype."""
  return _Built(_array(data, dtype, (), "C")[()])


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _Built:
  """numpy's _frombuffer(buffer, dtype, shape, order) of protocol-5 pickles (in-band buffers)."""
  if order not in ("C", "F"):
    raise _refuse(f"array order {_short(order)}")
  return _Built(_array(buffer, dtype, shape, order))


def _dtype(code: Any, align: Any = False, copy: Any = True) -> _Dtype:
  """numpy.dtype(code, align, copy) as NumPy pickles it; align / copy change nothing here."""
  del align, copy
  return _Dtype(_weight_dtype(code))


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
  """_codecs.encode(str, 'latin1'): how protocols 0-2 written by Python 3 store bytes."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise _refuse(f"_codecs.encode({_short(text)}, {_short(encoding)})")
  return text.encode("latin1")


def _empty_bytes() -> bytes:
  """bytes(): how protocols 0-2 written by Python 3 store b''."""
  return b""


def _plain_dict(items: Any = ()) -> dict:
  """collections.OrderedDict(...) read as a dict (dicts keep their order)."""
  if not isinstance(items, (list, tuple, dict)):
    raise _refuse(f"OrderedDict({_short(items)})")
  return dict(items)


# (module, name) a pickle may ask for -> what it gets. NumPy 1.x files name numpy.core.*, NumPy 2.x
# files numpy._core.*; Python 2 files name __builtin__ where Python 3 files name builtins.
_REBUILDERS: dict[tuple[str, str], Callable[..., Any]] = {
  ("numpy", "dtype"): _dtype,
  ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
  ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
  ("numpy.core.multiarray", "scalar"): _scalar,
  ("numpy._core.multiarray", "scalar"): _scalar,
  ("numpy.core.numeric", "_frombuffer"): _frombuffer,
  ("numpy._core.numeric", "_frombuffer"): _frombuffer,
  ("_codecs", "encode"): _latin1_bytes,
  ("builtins", "bytes"): _empty_bytes,
  ("__builtin__", "bytes"): _empty_bytes,
  ("collections", "OrderedDict"): _plain_dict,
}
ALLOWED_GLOBALS: dict[tuple[str, str], _Global] = {
  ("numpy", "ndarray"): _NDARRAY,
  **{key: _Global(".".join(key), fn) for key, fn in _REBUILDERS.items()},
}


class _WeightUnpickler(pickle.Unpickler):
  """pickle.Unpickler whose only callables are ALLOWED_GLOBALS."""

  def find_class(self, module: str, name: str) -> Any:
    allowed = ALLOWED_GLOBALS.get((module, name))
    if allowed is None:
      raise _refuse(f"it asks for {module}.{name}")
    return allowed

  def persistent_load(self, pid: Any) -> Any:
    raise _refuse(f"it asks for persistent id {_short(pid)}")


# --------------------------------------------------------------------------------------------
# Placeholders -> values.
# --------------------------------------------------------------------------------------------


def _resolve(obj: Any, done: dict[int, Any], open_ids: set[int]) -> Any:
  """Swaps placeholders for their numpy values in a tree of plain containers."""
  if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, bytearray)):
    return obj
  if isinstance(obj, (_Built, _Dtype)):
    return obj.value
  if isinstance(obj, _Array):
    if obj.value is None:
      raise _refuse("a numpy array that the file never fills (no BUILD)")
    return obj.value
  key = id(obj)
  if key in done:
    return done[key]
  if key in open_ids:
    raise _refuse(f"a {type(obj).__name__} that contains itself")
  open_ids.add(key)
  if type(obj) is dict:
    out = {}
    for k, v in obj.items():
      out[_resolve(k, done, open_ids)] = _resolve(v, done, open_ids)
  elif type(obj) in (list, tuple):
    out = type(obj)(_resolve(v, done, open_ids) for v in obj)
  else:  # the unpickler builds no other type from allowed opcodes and globals
    raise _refuse(f"an object of type {type(obj).__name__}")
  open_ids.discard(key)
  done[key] = out
  return out


def load_weight_pickle(f: BinaryIO) -> Any:
  """Unpickles a weight file from an open binary file; see read_weight_pickle."""
  tree = _WeightUnpickler(f, encoding="latin1").load()
  try:
    return _resolve(tree, {}, set())
  except (RecursionError, TypeError) as e:  # too deeply nested; an array as a dict key
    raise _refuse(f"a tree that cannot be rebuilt ({type(e).__name__}: {e})") from None


def read_weight_pickle(path: str) -> Any:
  """Reads a pickled weight file: nested dicts / lists / tuples of str, numbers, numpy arrays.

  Python 2 pickles (Caffe2 Detectron) are read with encoding latin1, so their str come back as
  str and their array bytes intact. OrderedDicts come back as dicts.
  Raises:
    UnsafePickleError (a pickle.UnpicklingError) naming the file and what it asked for, for any
    callable outside ALLOWED_GLOBALS, object or structured dtypes and other non-weight content;
    nothing the file names is called. Other pickle errors (truncated files) pass through.
  """
  try:
    with open(path, "rb") as f:
      return load_weight_pickle(f)
  except UnsafePickleError as e:
    raise UnsafePickleError(f"{path}: {e}") from None
