"""Small file helpers: atomic writes (readers never see half a file) and JSON reading."""

from collections.abc import Iterator
import contextlib
import json
import os
import shutil
import tempfile
from typing import Any


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same directory and a rename."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _to_json(x: Any) -> Any:
  """json.dump's `default`: numpy arrays and scalars as lists / numbers, sets sorted."""
  if hasattr(x, "tolist"):
    return x.tolist()
  if isinstance(x, (set, frozenset)):
    return sorted(x)
  raise TypeError(f"{type(x).__name__} is not JSON serializable")


def write_json(path: str, obj: Any, **dump_kwargs) -> None:
  """json.dump(obj) to `path` atomically; numpy values become lists / numbers."""
  atomic_write(path, json.dumps(obj, default=_to_json, **dump_kwargs))


def read_json(path: str, default: Any = None) -> Any:
  """The JSON value in `path`, or `default` when the file does not exist."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


@contextlib.contextmanager
def atomic_directory(directory: str, overwrite: bool = True) -> Iterator[str]:
  """Yields a temporary directory beside `directory` that becomes `directory` on success.

  The caller fills the yielded path; on leaving the block it is renamed onto `directory` (an
  existing one is replaced when `overwrite`, else FileExistsError before anything is written).
  On any failure nothing is left behind and a replaced directory is put back.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} exists (pass overwrite=True / --overwrite to replace it).")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
  old = None
  try:
    yield tmp
    if os.path.exists(directory):
      old = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".old-", dir=parent)
      os.rename(directory, os.path.join(old, "d"))
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not os.path.exists(directory):
      os.rename(os.path.join(old, "d"), directory)  # put the previous one back
    raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
