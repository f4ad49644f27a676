"""Warm start: a new run's initial state (initial_state): the model's fresh init, then
* config.init_from: a backbone checkpoint (rethink_jax.convert.save_backbone's format, from
  converted ImageNet weights or from pre-training) loaded into params["backbone"]["bottom_up"];
  its meta.json must agree with the config (check_backbone_meta);
* config.init_from_detector: a whole detector (rethink_jax.detector_checkpoint's format) loaded
  into every variable; the class heads (CLASS_HEADS) keep their fresh init when the
  checkpoint's num_classes differs from the recipe's, and architecture fields must agree
  (ARCHITECTURE_FIELDS).
"""

import json
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rethink_jax import trainer


def _log(msg: str) -> None:
  trainer.log(msg, "train")


def _flat(tree: Any) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree) if tree else {}, sep="/")


def initial_state(config: ml_collections.ConfigDict, parts, rng, sample: dict) -> dict:
  """A new run's state: parts.init, then config.init_from (a backbone) or
  config.init_from_detector (a whole detector) when set."""
  if config.get("init_from") and config.get("init_from_detector"):
    raise ValueError(
      "set one of config.init_from (a backbone) and config.init_from_detector (a whole "
      f"detector), not both: {config.init_from!r}, {config.init_from_detector!r}"
    )
  if config.get("init_from_detector"):
    return init_from_detector(config, parts, rng, sample)["state"]
  state = parts.init(rng, sample)
  if config.get("init_from"):
    from rethink_jax import convert  # pylint: disable=g-import-not-at-top

    variables, meta = convert.load_backbone(config.init_from)
    check_backbone_meta(meta, config)
    report = load_backbone_into(state, variables)
    state = jax.device_put(report["state"], parts.state_sharding)
    _log(
      f"init_from {config.init_from} (source {meta.get('source')!r}): loaded "
      f"{len(report['loaded'])} arrays; missing {len(report['missing'])}: "
      f"{report['missing'][:20]}; unexpected {len(report['unexpected'])}: "
      f"{report['unexpected'][:20]}"
    )
    if not report["loaded"]:
      raise ValueError(f"init_from={config.init_from}: nothing matched the model's backbone")
  return state


# ------------------------------------------------------------------------------------------------
# init_from: a backbone's variables (convert.save_backbone's format).
# ------------------------------------------------------------------------------------------------
def check_backbone_meta(meta: dict, config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the config fields to set when a backbone checkpoint's meta.json
  disagrees with the config (norm, stride_in_1x1, width, groups, depth, pixel format)."""
  b, d = config.model.backbone, config.data
  problems = []

  def same_norm(a, c):
    # BN and SyncBN store the same variables (scale/bias + running mean/var).
    group = lambda n: "BN" if n in ("BN", "SyncBN") else n
    return group(a) == group(c)

  if "depth" in meta and int(meta["depth"]) != int(b.depth):
    problems.append(f"config.model.backbone.depth={meta['depth']} (config has {b.depth})")
  if "norm" in meta and not same_norm(meta["norm"], b.norm):
    problems.append(
      f"config.model.backbone.norm={meta['norm']!r} (config has {b.norm!r}); "
      "or convert the weights again with --norm " + repr(b.norm)
    )
  if "stride_in_1x1" in meta and bool(meta["stride_in_1x1"]) != bool(b.stride_in_1x1):
    problems.append(
      f"config.model.backbone.stride_in_1x1={bool(meta['stride_in_1x1'])} "
      f"(config has {b.stride_in_1x1})"
    )
  if "width" in meta and int(meta["width"]) != int(b.get("width", 64)):
    problems.append(f"config.model.backbone.width={meta['width']} (config has {b.get('width')})")
  for key, resnet_value in (("groups", 1), ("width_per_group", 64)):  # ResNeXt's; absent: ResNet
    if int(meta.get(key, resnet_value)) != int(b.get(key, resnet_value)):
      problems.append(
        f"config.model.backbone.{key}={meta.get(key, resnet_value)} (config has {b.get(key)})"
      )
  if "input_format" in meta and meta["input_format"] != d.get("input_format"):
    problems.append(
      f"config.data.input_format={meta['input_format']!r} (config has {d.get('input_format')!r})"
    )
  for key in ("pixel_mean", "pixel_std"):
    if (
      key in meta
      and meta[key] is not None
      and not np.allclose(
        np.asarray(meta[key], np.float64), np.asarray(d.get(key), np.float64), atol=1e-3
      )
    ):
      problems.append(
        f"config.data.{key}={tuple(float(v) for v in meta[key])} (config has {tuple(d.get(key))})"
      )
  if problems:
    raise ValueError(
      f"init_from={config.init_from}: the backbone checkpoint (meta.json: source "
      f"{meta.get('source')!r}) disagrees with the config; set\n  " + "\n  ".join(problems)
    )


def load_backbone_into(state: dict, backbone_vars: dict, where=("backbone", "bottom_up")) -> dict:
  """Copies a ResNet's variables {"params", ["frozen"|"batch_stats"]} into the model state under
  `where`. Returns a report {"loaded", "missing", "unexpected"} of "collection/path" keys;
  raises ValueError listing every shape mismatch (nothing is loaded then)."""
  prefix = "/".join(where)
  loaded, missing, unexpected, mismatched = [], [], [], []
  new = {"params": _flat(state["params"])}
  for coll, tree in state["collections"].items():
    new[coll] = _flat(tree)
  for coll in sorted(set(backbone_vars) | {"params"}):
    src = _flat(backbone_vars.get(coll, {}))
    dst = new.get(coll, {})
    targets = {k[len(prefix) + 1 :]: k for k in dst if k.startswith(prefix + "/")}
    for key, value in src.items():
      if key not in targets:
        unexpected.append(f"{coll}/{key}")
        continue
      full = targets[key]
      if tuple(np.shape(value)) != tuple(dst[full].shape):
        mismatched.append(
          f"{coll}/{key}: checkpoint {tuple(np.shape(value))} vs model {tuple(dst[full].shape)}"
        )
        continue
      dst[full] = jnp.asarray(value, dst[full].dtype)
      loaded.append(f"{coll}/{key}")
    missing += [f"{coll}/{k}" for k in targets if k not in src]
  if mismatched:
    raise ValueError(
      "init_from: shape mismatch between the backbone checkpoint and the model "
      "(check depth / width / norm in config.model.backbone):\n  " + "\n  ".join(mismatched)
    )
  state = dict(state)
  state["params"] = flax.traverse_util.unflatten_dict(new["params"], sep="/")
  state["collections"] = {
    c: flax.traverse_util.unflatten_dict(new[c], sep="/") for c in state["collections"]
  }
  return dict(
    state=state, loaded=sorted(loaded), missing=sorted(missing), unexpected=sorted(unexpected)
  )


# ------------------------------------------------------------------------------------------------
# init_from_detector: a whole detector's variables (detector_checkpoint.save_detector's format).
# ------------------------------------------------------------------------------------------------
# Parameters whose shapes follow num_classes: kept at their fresh init when the class count differs.
CLASS_HEADS = (
  "roi_heads/box_predictor/cls_score",
  "roi_heads/box_predictor/bbox_pred",
  "roi_heads/mask_head/predictor",
)
# Cascade R-CNN's stages each have a class-score layer (their box deltas are class-agnostic).
CASCADE_CLASS_HEAD = re.compile(r"roi_heads/box_predictor/\d+/cls_score/")
# Model-config fields the weights are trained for: a checkpoint and the recipe must agree on them.
ARCHITECTURE_FIELDS = (
  "backbone.depth",
  "backbone.norm",
  "backbone.num_groups",
  "backbone.stride_in_1x1",
  "backbone.width",
  "fpn.out_channels",
  "fpn.norm",
  "anchors.sizes",
  "anchors.aspect_ratios",
  "rpn.head_conv_dims",
  "box_head.name",
  "box_head.num_conv",
  "box_head.conv_dim",
  "box_head.num_fc",
  "box_head.fc_dim",
  "box_head.norm",
  "box_head.num_groups",
  "box_head.pooler_resolution",
  "mask_head.num_conv",
  "mask_head.conv_dim",
  "mask_head.norm",
  "mask_head.num_groups",
  "mask_head.pooler_resolution",
  "mask_head.resolution",
)
# Model-config sections that describe the checkpoint's use, not its weights (compared apart).
_NOT_ARCHITECTURE = ("num_classes", "input", "output")


def _plain_leaves(config: ml_collections.ConfigDict) -> dict:
  """{"a.b": value} of a config, tuples as lists (a config read from JSON holds lists)."""
  return flax.traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")


def _norm_kind(norm: Any) -> Any:
  # BN and SyncBN hold the same variables and compute the same inference.
  return "BN" if norm in ("BN", "SyncBN") else norm


def check_detector_config(
  checkpoint_model: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> list[str]:
  """Compares a detector checkpoint's model config with a recipe.

  Raises ValueError naming every ARCHITECTURE_FIELDS field that differs, and every input
  normalisation field (the checkpoint's model.input: format, pixel_mean, pixel_std) that differs
  from the recipe's data config, which is what the pipeline normalises with. Returns notes on
  the other differing fields (the recipe's values are used) and on the test-time image sizes.
  """
  ckpt, recipe = _plain_leaves(checkpoint_model), _plain_leaves(config.model)
  errors, notes = [], []
  for key in sorted(set(ckpt) | set(recipe)):
    if key.split(".")[0] in _NOT_ARCHITECTURE:
      continue
    a, b = ckpt.get(key, "<absent>"), recipe.get(key, "<absent>")
    if key.endswith(".norm"):
      a, b = _norm_kind(a), _norm_kind(b)
    if a == b:
      continue
    line = (
      f"model.{key}: checkpoint {ckpt.get(key, '<absent>')!r}, "
      f"recipe {recipe.get(key, '<absent>')!r}"
    )
    (errors if key in ARCHITECTURE_FIELDS else notes).append(line)

  d, inp = config.data, checkpoint_model.get("input", {})
  if inp.get("format") is not None and inp["format"] != d.get("input_format"):
    errors.append(
      f"set --config.data.input_format={inp['format']} (checkpoint model.input.format "
      f"{inp['format']!r}, recipe {d.get('input_format')!r})"
    )
  for key in ("pixel_mean", "pixel_std"):
    want = inp.get(key)
    if want is None:
      continue
    if not np.allclose(np.asarray(want, np.float64), np.asarray(d.get(key), np.float64), atol=1e-3):
      value = "(" + ", ".join(f"{float(v):g}" for v in want) + ")"
      errors.append(
        f"set --config.data.{key}='{value}' (checkpoint model.input.{key} {tuple(want)}, "
        f"recipe {tuple(d.get(key))})"
      )
  for ckpt_key, data_key in (("min_size_test", "min_size_test"), ("max_size_test", "max_size")):
    if inp.get(ckpt_key) is not None and inp[ckpt_key] != d.get(data_key):
      notes.append(
        f"model.input.{ckpt_key}: checkpoint {inp[ckpt_key]!r}, recipe data.{data_key} "
        f"{d.get(data_key)!r}"
      )
  if errors:
    raise ValueError(
      f"init_from_detector={config.get('init_from_detector')}: the detector checkpoint "
      "disagrees with the recipe:\n  " + "\n  ".join(errors)
    )
  return notes


def load_detector_into(state: dict, variables: dict, reinit_class_heads: bool) -> dict:
  """Copies a whole detector's variables {"params", [collections]} into a fresh train state.

  reinit_class_heads: parameters under CLASS_HEADS (and CASCADE_CLASS_HEAD) keep the state's
  values (fresh init) when True. Returns {"state", "loaded", "reinitialized"} ("collection/path"
  keys); raises ValueError naming every missing or leftover variable and every shape mismatch
  (nothing is loaded then).
  """
  colls = {"params": state["params"], **state["collections"]}
  dst = {c: _flat(t) for c, t in colls.items()}
  src = {c: _flat(t) for c, t in variables.items()}
  is_head = lambda c, k: (
    c == "params"
    and (any(k.startswith(h + "/") for h in CLASS_HEADS) or CASCADE_CLASS_HEAD.match(k) is not None)
  )
  loaded, reinitialized, problems = [], [], []
  for coll in sorted(set(dst) | set(src)):
    d, s = dst.get(coll, {}), src.get(coll, {})
    for key in sorted(set(d) | set(s)):
      name = f"{coll}/{key}"
      if reinit_class_heads and is_head(coll, key) and key in d:
        reinitialized.append(name)
        continue
      if key not in s:
        problems.append(f"{name}: missing from the checkpoint (model {tuple(d[key].shape)})")
      elif key not in d:
        problems.append(f"{name}: not in the model (checkpoint {tuple(np.shape(s[key]))})")
      elif tuple(np.shape(s[key])) != tuple(d[key].shape):
        problems.append(
          f"{name}: checkpoint {tuple(np.shape(s[key]))} vs model {tuple(d[key].shape)}"
        )
      else:
        d[key] = jnp.asarray(s[key], d[key].dtype)
        loaded.append(name)
  if problems:
    raise ValueError(
      "init_from_detector: the detector checkpoint does not fit the recipe's model:\n  "
      + "\n  ".join(problems)
    )
  unflat = {c: flax.traverse_util.unflatten_dict(t, sep="/") for c, t in dst.items()}
  state = dict(state, params=unflat.pop("params"), collections=unflat)
  return dict(state=state, loaded=loaded, reinitialized=reinitialized)


def init_from_detector(config: ml_collections.ConfigDict, parts, rng, sample: dict) -> dict:
  """A fresh state (parts.init(rng, sample)) holding config.init_from_detector's variables.

  The checkpoint is read and checked first (check_detector_config). Class heads are
  re-initialised when its num_classes differs from the recipe's; every decision is logged.
  Returns load_detector_into's report, its "state" placed on parts.state_sharding.
  """
  from rethink_jax import detector_checkpoint  # pylint: disable=g-import-not-at-top

  directory = config.init_from_detector
  variables, model_config, meta = detector_checkpoint.load_detector(directory)
  notes = check_detector_config(model_config, config)
  state = parts.init(rng, sample)
  ckpt_classes, recipe_classes = int(model_config.num_classes), int(config.model.num_classes)
  report = load_detector_into(state, variables, reinit_class_heads=ckpt_classes != recipe_classes)
  report["state"] = jax.device_put(report["state"], parts.state_sharding)
  _log(
    f"init_from_detector {directory} (source {meta.get('source')!r}, {ckpt_classes} classes "
    f"{meta.get('class_names')}): loaded {len(report['loaded'])} arrays"
  )
  if report["reinitialized"]:
    _log(
      f"re-initialised (checkpoint {ckpt_classes} classes, recipe {recipe_classes}): "
      + ", ".join(report["reinitialized"])
    )
  for note in notes:
    _log(f"init_from_detector: differs, the recipe's value is used: {note}")
  return report
