"""The safe weight-pickle reader: every layout NumPy and Python write loads; code never runs.

Each payload test first shows that plain `pickle.loads` of the same bytes does run the payload (it
creates a marker file), then that the safe reader refuses it, names what it asked for, and that
the marker is not created.
"""

import ast
import collections
import io
import os
import pickle
import struct
import subprocess
import time

import numpy as np
import pytest

from rethink_jax import safe_pickle
from rethink_jax.safe_pickle import UnsafePickleError

SEED = int(time.time() * 1000) % 2**31
print("test_safe_pickle seed", SEED)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------- pickle bytes written by hand
# Python 2's cPickle with NumPy 1.x (how Caffe2 Detectron wrote its weights) is not installable
# here, so its opcodes are written directly: protocol 2, byte strings as BINSTRING, module paths
# numpy.core.multiarray.


def op_global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def op_str(text: str) -> bytes:
  data = text.encode()
  return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def op_py2str(data: bytes) -> bytes:
  """A Python 2 str (bytes): read back as str with encoding latin1."""
  return pickle.BINSTRING + struct.pack("<i", len(data)) + data


def op_int(n: int) -> bytes:
  return pickle.BININT + struct.pack("<i", n)


def op_tuple(*items: bytes) -> bytes:
  return pickle.MARK + b"".join(items) + pickle.TUPLE


def op_call(func: bytes, *args: bytes) -> bytes:
  return func + op_tuple(*args) + pickle.REDUCE


def op_build(obj: bytes, state: bytes) -> bytes:
  return obj + state + pickle.BUILD


def op_dict(pairs: list[tuple[bytes, bytes]]) -> bytes:
  return pickle.EMPTY_DICT + pickle.MARK + b"".join(k + v for k, v in pairs) + pickle.SETITEMS


def protocol2(body: bytes) -> bytes:
  return pickle.PROTO + b"\x02" + body + pickle.STOP


def op_dtype(dtype: np.dtype, flags: int = 0, code: str = "") -> bytes:
  """numpy.dtype('f4', 0, 1) + BUILD (3, '<', None, None, None, -1, -1, flags), as NumPy 1.x."""
  code = code or f"{dtype.kind}{dtype.itemsize}"
  state = op_tuple(
    op_int(3),
    op_py2str(dtype.str[:1].encode()),
    pickle.NONE,
    pickle.NONE,
    pickle.NONE,
    op_int(-1),
    op_int(-1),
    op_int(flags),
  )
  return op_build(
    op_call(op_global("numpy", "dtype"), op_py2str(code.encode()), op_int(0), op_int(1)), state
  )


def op_array(
  a: np.ndarray,
  module: str = "numpy.core.multiarray",
  dtype: bytes = b"",
  data: bytes = b"",
  shape: tuple = (),
) -> bytes:
  """_reconstruct(ndarray, (0,), 'b') + BUILD (1, shape, dtype, is_fortran, bytes)."""
  empty = op_call(
    op_global(module, "_reconstruct"),
    op_global("numpy", "ndarray"),
    op_tuple(op_int(0)),
    op_py2str(b"b"),
  )
  fortran = a.flags.f_contiguous and not a.flags.c_contiguous
  state = op_tuple(
    op_int(1),
    op_tuple(*[op_int(n) for n in shape or a.shape]),
    dtype or op_dtype(a.dtype),
    pickle.NEWTRUE if fortran else pickle.NEWFALSE,
    data or op_py2str(a.tobytes(order="F" if fortran else "C")),
  )
  return op_build(empty, state)


def op_py2_value(v) -> bytes:
  if isinstance(v, dict):
    return op_dict([(op_py2str(k.encode("latin1")), op_py2_value(x)) for k, x in v.items()])
  if isinstance(v, np.ndarray):
    return op_array(v)
  if isinstance(v, str):
    return op_py2str(v.encode("latin1"))
  assert isinstance(v, int), type(v)
  return op_int(v)


def python2_numpy1_pickle(tree: dict) -> bytes:
  """Dicts of str -> numpy array / str / int, as Python 2 + NumPy 1.x pickled them (protocol 2)."""
  return protocol2(op_py2_value(tree))


def read(data: bytes):
  return safe_pickle.load_weight_pickle(io.BytesIO(data))


def random_arrays() -> dict:
  rng = np.random.default_rng(SEED)
  a = rng.normal(size=(4, 3, 2)).astype(np.float32)
  return {
    "conv1_w": a,
    "big_endian": a.astype(">f8"),
    "fortran": np.asfortranarray(a[0]),
    "strided": a[:, ::2],
    "ints": rng.integers(-9, 9, size=5),
    "u8": np.arange(7, dtype=np.uint8),
    "half": rng.normal(size=3).astype(np.float16),
    "mask": rng.normal(size=4) > 0,
    "complex": np.array([1 + 2j, -3j]),
    "empty": np.zeros((0, 3), np.float32),
    "zero_d": np.array(2.5),
    "names": np.array(["res2", "fc"]),
    "bytes": np.array([b"ab"]),
  }


def assert_same_arrays(got: dict, want: dict, byte_order: bool = True):
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert type(got[k]) is np.ndarray, k
    same_dtype = got[k].dtype.str[int(not byte_order) :] == v.dtype.str[int(not byte_order) :]
    assert same_dtype and got[k].shape == v.shape, (k, got[k].dtype, v.dtype)
    np.testing.assert_array_equal(got[k], v)
    assert got[k].flags.writeable, k


# ------------------------------------------------------------------------- what loads


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_protocol_round_trips(protocol):
  arrays = random_arrays()
  tree = {
    "blobs": arrays,
    "cfg": "MODEL:\n  TYPE: generalized_rcnn\n",
    "iter": 90000,
    "lr": 0.02,
    "flags": (True, False, None),
    "names": ["a", "b"],
    "raw": b"\x00\xff",
    "empty_raw": b"",
    "huge": 2**80,
    "scalar_f32": np.float32(1.5),
    "scalar_i64": np.int64(-3),
    "dtype": np.dtype(">i4"),
    "shared": [arrays["u8"]] * 2,
    "ordered": collections.OrderedDict([("b", 1), ("a", np.ones(2))]),
  }
  got = read(pickle.dumps(tree, protocol=protocol))
  assert_same_arrays(got["blobs"], arrays)
  assert got["blobs"]["fortran"].flags.f_contiguous
  for k in ("cfg", "iter", "lr", "flags", "names", "raw", "empty_raw", "huge", "dtype"):
    assert got[k] == tree[k] and type(got[k]) is type(tree[k]), k
  assert type(got["scalar_f32"]) is np.float32 and got["scalar_f32"] == 1.5
  assert type(got["scalar_i64"]) is np.int64 and got["scalar_i64"] == -3
  assert got["shared"][0] is got["shared"][1]
  assert type(got["ordered"]) is dict and list(got["ordered"]) == ["b", "a"]


def test_python2_numpy1_pickle_as_detectron_wrote_it():
  arrays = random_arrays()
  del arrays["names"], arrays["bytes"], arrays["complex"]  # numeric blobs, as in Caffe2 files
  data = python2_numpy1_pickle({**arrays, "cfg": "TRAIN:\n  WEIGHTS: ''\n", "iter": 7})
  assert b"numpy.core.multiarray\n_reconstruct" in data and b"numpy._core" not in data
  plain = pickle.loads(data, encoding="latin1")  # NumPy itself reads the hand-written bytes
  got = read(data)
  assert_same_arrays({k: got[k] for k in arrays}, arrays)
  # NumPy swaps a Python 2 file's big-endian arrays to native order: same values.
  assert_same_arrays({k: plain[k] for k in arrays}, arrays, byte_order=False)
  assert got["cfg"] == plain["cfg"] == "TRAIN:\n  WEIGHTS: ''\n" and got["iter"] == 7


def test_read_weight_pickle_names_the_file(tmp_path):
  path = tmp_path / "weights.pkl"
  path.write_bytes(protocol2(op_call(op_global("os", "system"), op_str("true"))))
  with pytest.raises(
    UnsafePickleError,
    match=r"weights\.pkl: it asks for os\.system: not a plain "
    r"weight file",
  ):
    safe_pickle.read_weight_pickle(str(path))
  path.write_bytes(pickle.dumps({"w": np.ones(3)}))
  np.testing.assert_array_equal(safe_pickle.read_weight_pickle(str(path))["w"], np.ones(3))


# ------------------------------------------------------------------------- payloads


class _Reduce:
  """Pickles as `func(*args)`: what a malicious weight file does."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def payloads(marker) -> dict:
  """name -> (pickle bytes that create `marker` when unpickled, what the refusal names)."""
  marker = str(marker)
  system = _Reduce(os.system, f"touch {marker}")
  as_weights = lambda evil: {"blobs": {"conv1_w": np.ones((2, 3), np.float32), "evil": evil}}
  return {
    "os.system": (pickle.dumps(as_weights(system), protocol=2), f"{os.name}.system"),
    "os.system, protocol 0 text": (
      b"cos\nsystem\n(Vtouch " + marker.encode() + b"\ntR.",
      "os.system",
    ),
    "os.system, protocol 5": (pickle.dumps(as_weights(system), protocol=5), f"{os.name}.system"),
    "builtins.eval": (
      pickle.dumps(as_weights(_Reduce(eval, f"open({marker!r}, 'w').close()"))),
      "builtins.eval",
    ),
    "subprocess.Popen": (
      pickle.dumps(as_weights(_Reduce(subprocess.Popen, ["touch", marker]))),
      "subprocess.Popen",
    ),
    # getattr on the allowed numpy.ndarray would reach ndarray.tofile, which writes a file.
    "builtins.getattr": (
      pickle.dumps(as_weights(_Reduce(np.ndarray.tofile, np.ones(3), marker))),
      "builtins.getattr",
    ),
    # An object array whose item is the os.system call: its dtype is refused first.
    "object array": (
      pickle.dumps(as_weights(np.array([system, 1], dtype=object))),
      "numpy.dtype('O8') is an object dtype",
    ),
    # The same call inside an object field of a structured array.
    "object field": (
      pickle.dumps(as_weights(np.array([(1.0, system)], dtype=[("w", "f4"), ("evil", "O")]))),
      "structured or void",
    ),
  }


def _run_plain(data: bytes):
  obj = pickle.loads(data, encoding="latin1")
  evil = obj["blobs"]["evil"] if isinstance(obj, dict) else obj
  if isinstance(evil, subprocess.Popen):
    evil.wait()


@pytest.mark.parametrize("name", list(payloads("m")))
def test_payloads_are_refused_and_never_run(tmp_path, name):
  marker = tmp_path / "marker"
  data, asked = payloads(marker)[name]
  _run_plain(data)  # the payload is real: plain pickle runs it
  assert marker.exists(), name
  marker.unlink()
  with pytest.raises(UnsafePickleError) as err:
    read(data)
  assert asked in str(err.value) and "not a plain weight file" in str(err.value)
  time.sleep(0.2)  # a process it might have started has had time to create the marker
  assert not marker.exists(), name


def test_refusals_of_crafted_numpy_opcodes():
  a = np.arange(6, dtype=np.float64).reshape(2, 3)
  ndarray = op_global("numpy", "ndarray")
  crafted = {
    # NumPy's own dtype __setstate__ takes these flags and then reads the float bytes as
    # PyObject pointers (memory corruption): the file's flags never reach NumPy here.
    "object flags on f8": (op_array(a, dtype=op_dtype(a.dtype, flags=0x3F)), "object flags"),
    "object dtype via the NumPy 2 path": (
      op_array(a, "numpy._core.multiarray", dtype=op_dtype(a.dtype, code="O8")),
      "object dtype",
    ),
    "list data on a float dtype": (
      op_array(a, data=pickle.EMPTY_LIST + op_int(1) + pickle.APPEND),
      "type list",
    ),
    "fewer bytes than elements": (op_array(a, data=op_py2str(b"\x00" * 8)), "with 8 bytes"),
    "_reconstruct of a dtype": (
      op_call(
        op_global("numpy.core.multiarray", "_reconstruct"),
        op_dtype(a.dtype),
        op_tuple(op_int(0)),
        op_py2str(b"b"),
      ),
      "_reconstruct of",
    ),
    "numpy.ndarray called": (
      op_call(ndarray, op_tuple(op_int(10**6)), op_py2str(b"f8")),
      "numpy.ndarray",
    ),
    "comma dtype string": (op_dtype(a.dtype, code="f4,O"), "numpy.dtype('f4,O')"),
    "sub-array dtype string": (op_dtype(a.dtype, code="(2,)f4"), "numpy.dtype('(2,)f4')"),
    "datetime dtype": (op_dtype(a.dtype, code="M8"), "datetime"),
    "dtype of a list": (
      op_call(
        op_global("numpy", "dtype"),
        pickle.EMPTY_LIST + op_tuple(op_str("a"), op_str("O")) + pickle.APPEND,
      ),
      "numpy.dtype([('a', 'O')])",
    ),
    "BUILD on a finished scalar": (
      op_build(
        op_call(
          op_global("numpy.core.multiarray", "scalar"), op_dtype(a.dtype), op_py2str(b"\x00" * 8)
        ),
        op_tuple(op_int(1)),
      ),
      "BUILD on a finished numpy float64",
    ),
    "_codecs.encode to utf-16": (
      op_call(op_global("_codecs", "encode"), op_str("x"), op_str("utf-16")),
      "_codecs.encode",
    ),
    "copy_reg._reconstructor": (
      op_call(op_global("copy_reg", "_reconstructor"), op_global("__builtin__", "object")),
      "copy_reg._reconstructor",
    ),
    "BUILD setting an allowed global's __defaults__": (
      op_build(
        op_global("collections", "OrderedDict"),
        op_tuple(pickle.NONE, op_dict([(op_str("__defaults__"), op_tuple(op_str("injected")))])),
      ),
      "BUILD on collections.OrderedDict",
    ),
    "list that contains itself": (
      pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + pickle.BINGET + b"\x00" + pickle.APPEND,
      "contains itself",
    ),
  }
  for name, (body, asked) in crafted.items():
    with pytest.raises(UnsafePickleError) as err:
      read(protocol2(body))
    assert asked in str(err.value), (name, str(err.value))


def test_huge_shape_is_refused_before_any_allocation():
  body = op_array(np.zeros(1), data=op_py2str(b"\x00" * 8), shape=(2**30, 2**30))
  with pytest.raises(UnsafePickleError, match=r"shape \(1073741824, 1073741824\)"):
    read(protocol2(body))


def test_persistent_ids_are_refused():

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      return "storage/0" if isinstance(obj, np.ndarray) else None

  f = io.BytesIO()
  Pickler(f, protocol=2).dump({"w": np.ones(2)})
  with pytest.raises(UnsafePickleError, match="persistent id 'storage/0'"):
    read(f.getvalue())


def test_allowed_globals_are_only_this_modules_rebuilders():
  assert sorted(".".join(k) for k in safe_pickle.ALLOWED_GLOBALS) == [
    "__builtin__.bytes",
    "_codecs.encode",
    "builtins.bytes",
    "collections.OrderedDict",
    "numpy._core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy._core.numeric._frombuffer",
    "numpy.core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy.core.numeric._frombuffer",
    "numpy.dtype",
    "numpy.ndarray",
  ]
  for target in safe_pickle.ALLOWED_GLOBALS.values():
    assert target.build.__module__ == safe_pickle.__name__, target


# ------------------------------------------------------------------------- the rest of the package


def _unsafe_reads(source: str) -> list[str]:
  """Calls that can run code from a file: pickle / marshal loads, yaml.load without SafeLoader,
  np.load without allow_pickle=False, torch.load without weights_only=True."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
      continue
    owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
    kw = {k.arg: k.value for k in node.keywords}
    const = lambda k, kw=kw: getattr(kw.get(k), "value", None)
    call = f"{owner}.{node.func.attr}"
    if owner in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") and node.func.attr in (
      "load",
      "loads",
      "Unpickler",
      "open",
    ):
      found.append(f"line {node.lineno}: {call}")
    elif owner == "yaml" and node.func.attr in (
      "load",
      "load_all",
      "unsafe_load",
      "full_load",
      "unsafe_load_all",
      "full_load_all",
    ):
      loader = kw.get("Loader")
      if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
        found.append(f"line {node.lineno}: {call} (use yaml.safe_load)")
    elif owner in ("np", "numpy", "jnp") and node.func.attr == "load":
      if const("allow_pickle") is not False:
        found.append(f"line {node.lineno}: {call} without allow_pickle=False")
    elif owner == "torch" and node.func.attr == "load" and const("weights_only") is not True:
      found.append(f"line {node.lineno}: {call} without weights_only=True")
  return found


def test_the_checker_finds_unsafe_reads():
  source = (
    "import pickle, yaml, numpy as np, torch\n"
    "pickle.load(f)\nyaml.load(s)\nnp.load(p)\ntorch.load(p)\n"
    "yaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\n"
    "np.load(p, allow_pickle=False)\ntorch.load(p, weights_only=True)\n"
  )
  assert [f.split(":")[0] for f in _unsafe_reads(source)] == [
    "line 2",
    "line 3",
    "line 4",
    "line 5",
  ]


def test_no_file_in_the_package_or_scripts_reads_unsafely():
  found = []
  for folder in ("rethink_jax", "scripts"):
    for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
      for name in names:
        if name.endswith(".py") and name != "safe_pickle.py":
          path = os.path.join(dirpath, name)
          with open(path) as f:
            found += [f"{os.path.relpath(path, ROOT)} {x}" for x in _unsafe_reads(f.read())]
  assert not found, found
