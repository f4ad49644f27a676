"""Whole-detector checkpoint directories: what the converter writes and the Predictor reads.

DIR/variables          orbax PyTree checkpoint of numpy arrays: {"params", ["batch_stats"]}
DIR/model_config.json  the model config (default_model_config() layout, every field)
DIR/meta.json          source, sha256, class_names (or null), label map and conversion notes

save_detector(dir, variables, model_config, meta)
variables, model_config, meta = load_detector(dir)
"""

import os
from typing import Any

import ml_collections
import numpy as np

from rethink_jax import files
from rethink_jax.models.config import default_model_config

META_KEYS = ("source", "sha256", "class_names")


def _to_numpy_tree(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree)


def save_detector(
  directory: str,
  variables: dict,
  model_config: ml_collections.ConfigDict,
  meta: dict,
  overwrite: bool = True,
) -> str:
  """Writes a detector checkpoint directory atomically (nothing is left behind on failure).

  variables: {"params": ..., ["batch_stats": ...]} of build_model(model_config), jax or numpy.
  meta: at least META_KEYS. Returns the absolute DIR.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  missing = [k for k in META_KEYS if k not in meta]
  if missing:
    raise ValueError(f"save_detector: meta lacks {missing} (has {sorted(meta)}).")
  if "params" not in variables:
    raise ValueError(f"save_detector: variables need 'params', got {sorted(variables)}.")
  config = ml_collections.ConfigDict(model_config).to_dict()
  with files.atomic_directory(directory, overwrite) as tmp:
    ocp.PyTreeCheckpointer().save(os.path.join(tmp, "variables"), _to_numpy_tree(dict(variables)))
    files.write_json(os.path.join(tmp, "model_config.json"), config, indent=2, sort_keys=True)
    files.write_json(os.path.join(tmp, "meta.json"), meta, indent=2, sort_keys=True)
  return os.path.abspath(directory)


def load_detector(directory: str) -> tuple[dict, ml_collections.ConfigDict, dict]:
  """Reads what save_detector wrote: (numpy variables, model config, meta).

  Fields the file lacks take default_model_config()'s values, so older files stay readable.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(directory)
  paths = {k: os.path.join(directory, k) for k in ("variables", "model_config.json", "meta.json")}
  absent = [k for k, p in paths.items() if not os.path.exists(p)]
  if absent:
    raise FileNotFoundError(
      f"{directory} is not a detector checkpoint directory: it lacks {absent} "
      "(write one with `python -m rethink_jax.convert --detector`)."
    )
  config = default_model_config()
  config.update(files.read_json(paths["model_config.json"]))
  variables = _to_numpy_tree(ocp.PyTreeCheckpointer().restore(paths["variables"]))
  return variables, config, files.read_json(paths["meta.json"])
