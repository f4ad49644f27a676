"""ImageNet-pretrained ResNets and ResNeXts (timm, torchvision, Detectron, Detectron2) -> this
project's ResNet.

  variables, meta = convert_backbone("R-50-GN.pkl", "detectron")
  build_resnet(depth=meta["depth"], norm=meta["norm"], stride_in_1x1=meta["stride_in_1x1"],
               groups=meta["groups"], width_per_group=meta["width_per_group"]
               ).apply(variables, x, train=False)

Command line (writes DIR/meta.json and an orbax checkpoint DIR/variables, atomically):
  python -m rethink_jax.convert --source detectron --input R-50-GN.pkl --output weights/R-50-GN

Every source is first renamed to Detectron2's backbone names ("stem.conv1.weight",
"res2.0.conv1.norm.weight", ...), then mapped onto the Flax tree (OIHW -> HWIO kernels, BN folded
into FrozenBN's affine: scale = gamma / sqrt(var + eps), bias = beta - mean * scale). Every
source tensor is either used or dropped on purpose (the classifier, optimizer state); anything
else, and every target left unfilled, is an error naming the key and the shapes.

Backbone checkpoint directories (also written by pre-training, read by the trainer's init_from):
  save_backbone(dir, variables, meta) / load_backbone(dir) -> (variables, meta).

Whole Mask R-CNN detectors (Detectron2 or torchvision model-zoo files) -> a detector checkpoint
directory (rethink_jax.detector_checkpoint):
  variables, model_config, meta = convert_detector("model_final.pkl", "detectron2",
                                                   d2_config="mask_rcnn_R_50_FPN_3x.yaml")
  python -m rethink_jax.convert --detector --source detectron2 --input model_final.pkl \
    --d2-config mask_rcnn_R_50_FPN_3x.yaml --output weights/mask_rcnn_R_50_FPN_3x
"""

import argparse
import hashlib
import os
import re
import sys
from typing import Any, Optional

import numpy as np

from rethink_jax import files
from rethink_jax import safe_pickle

SOURCES = ("timm", "torchvision", "detectron", "detectron2")
DEPTHS = {
  (2, 2, 2, 2, False): 18,
  (3, 4, 6, 3, False): 34,
  (3, 4, 6, 3, True): 50,
  (3, 4, 23, 3, True): 101,
  (3, 8, 36, 3, True): 152,
}
META_KEYS = (
  "depth",
  "norm",
  "stride_in_1x1",
  "width",
  "pixel_mean",
  "pixel_std",
  "input_format",
  "source",
  "sha256",
)
# Also in a converted backbone's meta (not required of other writers: absent means a ResNet).
RESNEXT_META_KEYS = ("groups", "width_per_group")
# ImageNet statistics on the 0..255 scale.
RGB_MEAN, RGB_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
BGR_MEAN, BGR_STD = RGB_MEAN[::-1], RGB_STD[::-1]
BN_EPS = 1e-5  # torchvision, timm and Detectron2 BatchNorm / FrozenBatchNorm


class ConversionError(ValueError):
  """The input file cannot be converted (unreadable, other architecture, leftover or missing)."""


# --------------------------------------------------------------------------------------------
# Backbone checkpoint directories.
# --------------------------------------------------------------------------------------------


def _to_numpy_tree(tree: Any) -> Any:
  if isinstance(tree, dict):
    out = {str(k): _to_numpy_tree(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
  return np.asarray(tree)


def save_backbone(directory: str, variables: dict, meta: dict, overwrite: bool = True) -> str:
  """Writes DIR/variables (orbax PyTree checkpoint of numpy arrays) and DIR/meta.json atomically.

  variables: the ResNet's variables {"params": ..., ["frozen" | "batch_stats"]: ...} (jax or numpy
  arrays). meta: at least META_KEYS. Everything is written to DIR.tmp-XXXX, then renamed onto DIR;
  on any failure nothing is left behind. An existing DIR is replaced when `overwrite`, else
  FileExistsError. Returns the absolute DIR.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  missing = [k for k in META_KEYS if k not in meta]
  if missing:
    raise ValueError(f"save_backbone: meta lacks {missing} (has {sorted(meta)}).")
  if "params" not in variables:
    raise ValueError(f"save_backbone: variables need 'params', got {sorted(variables)}.")
  with files.atomic_directory(directory, overwrite) as tmp:
    ocp.PyTreeCheckpointer().save(os.path.join(tmp, "variables"), _to_numpy_tree(dict(variables)))
    files.write_json(os.path.join(tmp, "meta.json"), meta, indent=2, sort_keys=True)
  return os.path.abspath(directory)


def load_backbone(directory: str) -> tuple[dict, dict]:
  """Reads what save_backbone wrote: (variables as nested dicts of numpy arrays, meta dict)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, "meta.json")
  meta = files.read_json(meta_path)
  if meta is None:
    raise FileNotFoundError(
      f"{meta_path} not found: not a backbone checkpoint directory "
      "(write one with `python -m rethink_jax.convert`)."
    )
  variables = ocp.PyTreeCheckpointer().restore(os.path.join(directory, "variables"))
  variables = _to_numpy_tree(variables)
  return variables, meta


def freeze_bn_stages(variables: dict, freeze_at: int, eps: float = BN_EPS) -> dict:
  """Folds the BN norms of the stages a `ResNet(freeze_at=...)` freezes into FrozenBN.

  A BN / SyncBN backbone checkpoint stores every norm as params scale/bias + batch_stats
  mean/var; ResNet(norm="BN", freeze_at=k) wants the stem and res2..res{k} norms as FrozenBN
  (collection "frozen"). Returns new variables with those norms folded
  (scale = gamma / sqrt(var + eps), bias = beta - mean * scale); GN or FrozenBN are unchanged.
  """
  from rethink_jax.models.resnet import frozen_param_prefixes  # pylint: disable=g-import-not-at-top

  frozen_stages = {p[0] for p in frozen_param_prefixes(freeze_at)}
  params = _flatten(variables.get("params", {}))
  stats = _flatten(variables.get("batch_stats", {}))
  out = {c: _flatten(t) for c, t in variables.items() if c not in ("params", "batch_stats")}
  out.setdefault("frozen", {})
  new_params, new_stats = dict(params), dict(stats)
  for path in params:
    if (
      path[0] in frozen_stages
      and path[-2:] == ("norm", "scale")
      and (path[:-1] + ("mean",)) in stats
    ):
      base = path[:-1]
      gamma, beta = params[base + ("scale",)], params[base + ("bias",)]
      mean, var = stats[base + ("mean",)], stats[base + ("var",)]
      scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
      out["frozen"][base + ("scale",)] = scale.astype(np.float32)
      out["frozen"][base + ("bias",)] = (np.asarray(beta) - np.asarray(mean) * scale).astype(
        np.float32
      )
      for d, names in ((new_params, ("scale", "bias")), (new_stats, ("mean", "var"))):
        for n in names:
          del d[base + (n,)]
  out["params"], out["batch_stats"] = new_params, new_stats

  def unflatten(flat):
    tree = {}
    for k, v in flat.items():
      _set(tree, k, v)
    return tree

  return {c: unflatten(t) for c, t in out.items() if t}


# --------------------------------------------------------------------------------------------
# Reading source files.
# --------------------------------------------------------------------------------------------


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _kind_of_file(path: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    return "safetensors"
  if ext in (".pkl", ".pickle"):
    return "pickle"
  if ext in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
    return "torch"
  with open(path, "rb") as f:
    head = f.read(8)
  if head[:2] == b"PK":
    return "torch"  # torch.save's zip format
  if head[:1] == b"\x80":
    return "pickle"
  return "safetensors"


def _read_torch(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(
      f"torch is needed to read .pth files ({path}); install torch, or "
      "convert the file to safetensors first."
    ) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(
      f"Cannot read {path} as a torch checkpoint: {type(e).__name__}: {e}"
    ) from e
  return obj


def _read_pickle(path: str) -> dict:
  """Caffe2 / Detectron2 pickles through the safe reader: a file that would run code is refused."""
  try:
    return safe_pickle.read_weight_pickle(path)
  except safe_pickle.UnsafePickleError as e:
    raise ConversionError(str(e)) from e
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"Cannot read {path} as a pickle: {type(e).__name__}: {e}") from e


def _read_safetensors(path: str) -> dict:
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(
      f"The safetensors package is needed to read {path} (pip install safetensors)."
    ) from e
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"Cannot read {path} as safetensors: {type(e).__name__}: {e}") from e


def _as_numpy(v: Any) -> Optional[np.ndarray]:
  if isinstance(v, np.ndarray):
    return v
  if hasattr(v, "detach") and hasattr(v, "numpy"):  # torch.Tensor
    return v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
  if isinstance(v, (int, float, np.generic)):
    return np.asarray(v)
  return None


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a .pth / .safetensors / .pkl file into a flat {name: numpy array}.

  Unwraps the usual containers ("state_dict", "model", "blobs") and a "module." prefix.
  Raises ConversionError for unreadable or truncated files.
  """
  if not os.path.isfile(path):
    raise ConversionError(f"Input file {path} does not exist.")
  kind = _kind_of_file(path)
  obj = {"torch": _read_torch, "pickle": _read_pickle, "safetensors": _read_safetensors}[kind](path)
  for _ in range(2):
    if isinstance(obj, dict):
      for key in ("state_dict", "model", "blobs", "model_state", "state_dict_ema"):
        if key in obj and isinstance(obj[key], dict):
          obj = obj[key]
          break
  if not isinstance(obj, dict):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a name -> tensor dict.")
  out = {}
  for k, v in obj.items():
    a = _as_numpy(v)
    if a is None:
      continue  # non-tensor bookkeeping (e.g. strings)
    k = str(k)
    out[k[len("module.") :] if k.startswith("module.") else k] = a
  if not out:
    raise ConversionError(f"{path} contains no tensors.")
  return out


# --------------------------------------------------------------------------------------------
# Renaming to Detectron2's backbone names.
# --------------------------------------------------------------------------------------------
# Each renamer returns (renamed {d2_name: array}, origin {d2_name: src_name}, dropped [src_name],
# leftovers [src_name]).


def _rename_by_rules(sd: dict, rules, drop) -> tuple[dict, dict, list, list]:
  """Renames each key by the first (pattern, new_name(match)) rule whose pattern matches it
  whole; keys for which drop(key) holds are dropped on purpose, the others are left over."""
  renamed, origin, dropped, left = {}, {}, [], []
  for k, v in sd.items():
    if drop(k):
      dropped.append(k)
      continue
    matches = ((re.fullmatch(pattern, k), new_name) for pattern, new_name in rules)
    new = next((new_name(m) for m, new_name in matches if m), None)
    if new is None:
      left.append(k)
    else:
      renamed[new], origin[new] = v, k
  return renamed, origin, dropped, left


_NORM_LEAF = r"(weight|bias|running_mean|running_var)"
# torchvision / timm: layerL.B.convC / bnC / downsample.{0,1} with L = Detectron2's stage - 1.
_TORCH_RULES = (
  (r"conv1\.weight", lambda m: "stem.conv1.weight"),
  (rf"bn1\.{_NORM_LEAF}", lambda m: f"stem.conv1.norm.{m[1]}"),
  (r"layer(\d)\.(\d+)\.conv(\d)\.weight", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
  (
    rf"layer(\d)\.(\d+)\.bn(\d)\.{_NORM_LEAF}",
    lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}",
  ),
  (
    r"layer(\d)\.(\d+)\.downsample\.0\.weight",
    lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight",
  ),
  (
    rf"layer(\d)\.(\d+)\.downsample\.1\.{_NORM_LEAF}",
    lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}",
  ),
)


def _rename_torch(sd: dict) -> tuple[dict, dict, list, list]:
  """torchvision / timm ResNet names -> Detectron2 names."""
  drop = lambda k: k.startswith("fc.") or k.endswith("num_batches_tracked")
  return _rename_by_rules(sd, _TORCH_RULES, drop)


_DETECTRON_BRANCH = {
  "branch1": "shortcut",
  "branch2a": "conv1",
  "branch2b": "conv2",
  "branch2c": "conv3",
}
# Detectron's files fold BN into *_bn_s / *_bn_b; Detectron2's ImageNetPretrained pickles in the
# same names (MSRA R-50, FAIR X-101-32x8d) keep it: *_bn_gamma, _beta, _running_mean, _running_var.
_DETECTRON_SUFFIX = {
  "w": "weight",
  "bn_s": "norm.weight",
  "bn_b": "norm.bias",
  "gn_s": "norm.weight",
  "gn_b": "norm.bias",
  "bn_rm": "norm.running_mean",
  "bn_riv": "norm.running_var",
  "bn_gamma": "norm.weight",
  "bn_beta": "norm.bias",
  "bn_running_mean": "norm.running_mean",
  "bn_running_var": "norm.running_var",
}
_DETECTRON_NORM_LEAF = "|".join(k for k in _DETECTRON_SUFFIX if k != "w")
_DETECTRON_RULES = (
  (r"conv1_w", lambda m: "stem.conv1.weight"),
  (
    rf"(?:res_conv1|conv1)_({_DETECTRON_NORM_LEAF})",
    lambda m: "stem.conv1." + _DETECTRON_SUFFIX[m[1]],
  ),
  (
    rf"res(\d)_(\d+)_(branch1|branch2a|branch2b|branch2c)_(w|{_DETECTRON_NORM_LEAF})",
    lambda m: f"res{m[1]}.{m[2]}.{_DETECTRON_BRANCH[m[3]]}.{_DETECTRON_SUFFIX[m[4]]}",
  ),
)


def _rename_detectron(sd: dict) -> tuple[dict, dict, list, list]:
  """Caffe2 Detectron names (res2_0_branch2a_w, res2_0_branch2a_bn_s, ...) -> Detectron2 names.

  Some Caffe2 files carry biases of the backbone convs (conv1_b, res2_0_branch2a_b): all zero,
  they are dropped (the convs are bias-free); any other value is left over, an error.
  """
  zero_conv_bias = lambda k: (
    re.fullmatch(r"(conv1|res\d_\d+_branch(1|2a|2b|2c))_b", k) is not None and not np.any(sd[k])
  )
  drop = lambda k: (
    k.endswith("_momentum")
    or re.fullmatch(r"(fc1000|pred|fc)_(w|b)", k) is not None
    or k in ("lr", "iter", "lr_x")
    or zero_conv_bias(k)
  )
  return _rename_by_rules(sd, _DETECTRON_RULES, drop)


def _rename_detectron2(sd: dict) -> tuple[dict, dict, list, list]:
  """A Detectron2 model's backbone.bottom_up.* (or bare stem./resN. names) -> Detectron2 names."""
  prefix = "backbone.bottom_up."
  has_prefix = any(k.startswith(prefix) for k in sd)
  renamed, origin, dropped, left = {}, {}, [], []
  for k, v in sd.items():
    name = k[len(prefix) :] if has_prefix and k.startswith(prefix) else (None if has_prefix else k)
    if name is None or k in ("pixel_mean", "pixel_std"):
      dropped.append(k)  # FPN, RPN, ROI heads, pixel statistics (read into meta)
      continue
    if name.endswith("num_batches_tracked") or name.startswith(("fc.", "linear.")):
      dropped.append(k)
      continue
    if re.fullmatch(
      r"(stem\.conv1|res\d\.\d+\.(conv[123]|shortcut))\.(weight|norm\.(weight|bias|"
      r"running_mean|running_var))",
      name,
    ):
      renamed[name], origin[name] = v, k
    else:
      left.append(k)
  return renamed, origin, dropped, left


# --------------------------------------------------------------------------------------------
# Detectron2 names -> Flax variables.
# --------------------------------------------------------------------------------------------


def infer_depth(d2: dict) -> int:
  """Depth from Detectron2-named tensors: blocks per stage and bottleneck (conv3) or basic."""
  blocks = []
  for s in range(2, 6):
    idx = {int(m.group(1)) for k in d2 for m in [re.match(rf"res{s}\.(\d+)\.", k)] if m}
    if not idx:
      raise ConversionError(
        f"No res{s} blocks found: not a ResNet checkpoint (first tensors: {sorted(d2)[:5]})."
      )
    blocks.append(max(idx) + 1)
  bottleneck = any(".conv3." in k for k in d2)
  key = tuple(blocks) + (bottleneck,)
  if key not in DEPTHS:
    raise ConversionError(
      f"Blocks per stage {tuple(blocks)} (bottleneck={bottleneck}) match no "
      f"ResNet depth of {sorted(DEPTHS.values())}."
    )
  return DEPTHS[key]


def infer_groups(d2: dict) -> tuple[int, int]:
  """(groups, width_per_group) of the bottleneck 3x3 convs, from res2.0's conv1 and conv2 (at
  stem width 64; (1, 64) for ResNets and basic blocks). Other blocks are checked against the
  target's shapes afterwards."""
  conv1, conv2 = d2.get("res2.0.conv1.weight"), d2.get("res2.0.conv2.weight")
  if conv1 is None or conv2 is None or "res2.0.conv3.weight" not in d2:
    return 1, 64
  bottleneck, per_group = int(np.shape(conv1)[0]), int(np.shape(conv2)[1])
  if np.ndim(conv2) != 4 or per_group == 0 or bottleneck % per_group:
    raise ConversionError(
      f"res2.0.conv2 kernel {tuple(np.shape(conv2))} after a {bottleneck}-channel conv1: its "
      "input channels per group do not divide the bottleneck."
    )
  return bottleneck // per_group, per_group


def _source_norm_kind(d2: dict) -> str:
  """'BN' (running statistics), 'affine' (Caffe2 *_bn_s/_bn_b: already folded) or 'GN'."""
  if any(k.endswith("running_mean") for k in d2):
    return "BN"
  return "GN"


def _set(tree: dict, path: tuple, value: np.ndarray):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _flatten(tree: dict, prefix: tuple = ()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _template(
  depth: int, norm: str, stride_in_1x1: bool, groups: int = 1, width_per_group: int = 64
) -> dict:
  """{(collection, *path): shape} of the ResNet's variables, without computing anything."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from rethink_jax.models.resnet import build_resnet  # pylint: disable=g-import-not-at-top

  model = build_resnet(
    depth=depth,
    norm=norm,
    stride_in_1x1=stride_in_1x1,
    groups=groups,
    width_per_group=width_per_group,
  )
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  shapes = jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)
  return _flatten(dict(shapes))


def _module_path(name: str) -> tuple:
  """'res2.0.conv1' -> ('res2', '0', 'conv1'); 'stem.conv1' -> ('stem', 'conv1')."""
  return tuple(name.split("."))


def d2_to_variables(
  d2: dict, origin: dict, norm: str, src_kind: str, eps: float = BN_EPS
) -> tuple[dict, list[tuple[str, str, tuple]], dict]:
  """Maps Detectron2-named tensors onto Flax variables for the target `norm`.

  Returns (variables, used, sources) with used = [(source key, target path, source shape)] and
  sources = {target path tuple: source key(s)}.
  """
  variables: dict = {}
  used = []
  sources = {}
  convs = sorted(
    {k.rsplit(".weight", 1)[0] for k in d2 if k.endswith(".weight") and ".norm." not in k}
  )
  for conv in convs:
    path = _module_path(conv)
    w = d2[conv + ".weight"]
    if w.ndim != 4:
      raise ConversionError(
        f"{origin[conv + '.weight']}: expected a 4-d OIHW conv kernel, got shape {w.shape}."
      )
    tpath = ("params",) + path + ("kernel",)
    _set(variables, tpath, np.ascontiguousarray(w.transpose(2, 3, 1, 0)))
    used.append((origin[conv + ".weight"], "/".join(tpath), w.shape))
    sources[tpath] = origin[conv + ".weight"]
    n = conv + ".norm."
    names = [k for k in d2 if k.startswith(n)]
    if not names:
      continue
    gamma, beta = d2.get(n + "weight"), d2.get(n + "bias")
    if gamma is None or beta is None:
      raise ConversionError(f"{conv}: norm has {names} but needs weight and bias.")
    if src_kind == "BN":
      mean, var = d2.get(n + "running_mean"), d2.get(n + "running_var")
      if mean is None or var is None:
        raise ConversionError(f"{conv}: BN norm lacks running_mean/running_var (has {names}).")
    elif src_kind == "affine":
      mean = np.zeros_like(gamma)
      var = np.full_like(gamma, 1.0 - eps)  # so that gamma / sqrt(var + eps) == gamma
    else:
      mean = var = None
    gamma, beta = gamma.astype(np.float32), beta.astype(np.float32)
    if norm == "GN":
      if src_kind != "GN":
        raise ConversionError(
          f"The checkpoint's norms are BatchNorm ({src_kind}); they cannot "
          "become GN. Use --norm FrozenBN, BN or SyncBN."
        )
      out = {
        ("params",) + path + ("norm", "scale"): gamma,
        ("params",) + path + ("norm", "bias"): beta,
      }
    elif src_kind == "GN":
      raise ConversionError(
        f"The checkpoint's norms are GroupNorm; they cannot become {norm}. Use --norm GN."
      )
    elif norm == "FrozenBN":
      scale = gamma / np.sqrt(var.astype(np.float64) + eps)
      out = {
        ("frozen",) + path + ("norm", "scale"): scale.astype(np.float32),
        ("frozen",) + path + ("norm", "bias"): (beta - mean * scale).astype(np.float32),
      }
    elif norm in ("BN", "SyncBN"):
      out = {
        ("params",) + path + ("norm", "scale"): gamma,
        ("params",) + path + ("norm", "bias"): beta,
        ("batch_stats",) + path + ("norm", "mean"): mean.astype(np.float32),
        ("batch_stats",) + path + ("norm", "var"): var.astype(np.float32),
      }
    else:
      raise ConversionError(f"Unknown target norm {norm!r}.")
    for tpath, value in out.items():
      _set(variables, tpath, value)
      sources[tpath] = ", ".join(origin[k] for k in sorted(names))
    collections = sorted({t[0] for t in out})
    for k in sorted(names):
      used.append((origin[k], "+".join(collections) + "/" + "/".join(path) + "/norm", d2[k].shape))
  return variables, used, sources


def _check_against_template(variables: dict, template: dict, origin_of_path) -> None:
  got = _flatten(variables)
  errors = []
  for path, shape in sorted(template.items()):
    if path not in got:
      errors.append(f"target {'/'.join(path)} {shape} was not filled by any source tensor")
    elif tuple(got[path].shape) != shape:
      errors.append(
        f"{origin_of_path(path)} -> {'/'.join(path)}: source shape "
        f"{tuple(got[path].shape)} != target shape {shape}"
      )
  for path in sorted(set(got) - set(template)):
    errors.append(
      f"{origin_of_path(path)} -> {'/'.join(path)} {tuple(got[path].shape)} has no "
      "place in the target ResNet"
    )
  if errors:
    raise ConversionError(
      "Conversion failed:\n  "
      + "\n  ".join(errors[:40])
      + (f"\n  ... and {len(errors) - 40} more" if len(errors) > 40 else "")
    )


def convert_backbone(
  path: str,
  source: str,
  depth: Optional[int] = None,
  norm: Optional[str] = None,
  stride_in_1x1: Optional[bool] = None,
  input_format: Optional[str] = None,
  verbose: bool = False,
) -> tuple[dict, dict]:
  """Converts a pretrained ResNet or ResNeXt checkpoint into this project's ResNet variables.

  ResNeXts (torchvision resnext101_32x8d, timm resnext*, Detectron's X-152-32x8d-IN5k.pkl,
  Detectron2's X-101-32x8d.pkl) are recognised by their grouped 3x3 convs (`infer_groups`).

  Args:
    path: .pth / .pt (needs torch), .safetensors, or .pkl (Caffe2 / Detectron2 pickles).
    source: "timm", "torchvision", "detectron" (Caffe2 blob names: MSRA *_bn_s/_bn_b with the
      stride in the 1x1 conv, FAIR *_gn_s/_gn_b and FB's ResNeXts with the stride in the 3x3
      conv; BGR input whose std is folded into conv1, except Detectron2's ResNeXt pickles with
      unfolded BN, *_bn_running_var: their configs divide by PIXEL_STD [57.375, 57.12, 58.395])
      or "detectron2".
    depth: checked against the file when given, inferred otherwise.
    norm: target norm. BN sources: "FrozenBN" (default, folded), "BN" or "SyncBN" (initialised
      from the statistics); GN sources: "GN".
    stride_in_1x1: only for "detectron2", whose files do not say; default True for frozen-BN
      ResNet checkpoints (MSRA-initialised), False otherwise (ResNeXts: "a C2 model").
    input_format: only for "detectron2": "BGR" (its default INPUT.FORMAT) or "RGB".
  Returns:
    (variables, meta): variables for ResNet(depth=meta["depth"], norm=meta["norm"],
    stride_in_1x1=meta["stride_in_1x1"], groups=meta["groups"],
    width_per_group=meta["width_per_group"]); meta with META_KEYS, RESNEXT_META_KEYS, "used"
    and "dropped" lists.
  Raises:
    ConversionError (a ValueError) naming the offending keys and shapes.
  """
  if source not in SOURCES:
    raise ConversionError(f"Unknown source {source!r}; expected one of {SOURCES}.")
  if norm is not None and norm not in ("GN", "FrozenBN", "BN", "SyncBN"):
    raise ConversionError(f"Unknown norm {norm!r}; expected GN, FrozenBN, BN or SyncBN.")
  sd = read_state_dict(path)
  renamer = {
    "timm": _rename_torch,
    "torchvision": _rename_torch,
    "detectron": _rename_detectron,
    "detectron2": _rename_detectron2,
  }[source]
  d2, origin, dropped, left = renamer(sd)
  if left:
    raise ConversionError(
      f"{len(left)} tensors of {path} match no {source} ResNet name (another architecture?): "
      + ", ".join(f"{k} {tuple(sd[k].shape)}" for k in left[:20])
    )
  file_depth = infer_depth(d2)
  if depth is not None and depth != file_depth:
    raise ConversionError(f"depth={depth} was requested but {path} holds a ResNet-{file_depth}.")
  depth = file_depth
  groups, width_per_group = infer_groups(d2)

  src_kind = _source_norm_kind(d2)
  if source == "detectron" and src_kind == "GN":
    if any(k.endswith(("_bn_s", "_bn_b")) for k in sd):
      src_kind = "affine"  # MSRA: BN already folded into per-channel affines
  norm = norm or ("GN" if src_kind == "GN" else "FrozenBN")

  if input_format is not None and (source != "detectron2" or input_format not in ("RGB", "BGR")):
    raise ConversionError(
      f"input_format={input_format!r}: only detectron2 files take one, "
      "RGB or BGR; the other sources' colour order is fixed."
    )
  if stride_in_1x1 is not None and source != "detectron2":
    raise ConversionError(
      f"stride_in_1x1: only detectron2 files take one; {source} weights fix it."
    )
  if source in ("timm", "torchvision"):
    stride, fmt, pixel_mean, pixel_std = False, "RGB", RGB_MEAN, RGB_STD
  elif source == "detectron":
    # MSRA (BN) ResNets carry the stride in the 1x1 conv; FAIR GN ResNets and FB's ResNeXts in
    # the 3x3 conv. Detectron subtracts the mean only (std folded into conv1); Detectron2's
    # unfolded ResNeXt (X-101-32x8d.pkl) divides by the BGR std as well.
    stride = src_kind in ("affine", "BN") and groups == 1
    fmt, pixel_mean, pixel_std = "BGR", BGR_MEAN, [1.0, 1.0, 1.0]
    if src_kind == "BN" and groups > 1:
      pixel_std = BGR_STD
  else:
    fmt = input_format or "BGR"  # Detectron2's default INPUT.FORMAT
    pixel_mean = BGR_MEAN if fmt == "BGR" else RGB_MEAN
    pixel_std = [1.0, 1.0, 1.0] if fmt == "BGR" else RGB_STD
    if "pixel_mean" in sd:
      pixel_mean = [float(v) for v in np.ravel(sd["pixel_mean"])]
    if "pixel_std" in sd:
      pixel_std = [float(v) for v in np.ravel(sd["pixel_std"])]
    # FrozenBatchNorm2d has no num_batches_tracked: such models were fine-tuned from MSRA weights.
    frozen_bn = src_kind == "BN" and not any(k.endswith("num_batches_tracked") for k in sd)
    msra = frozen_bn and groups == 1
    stride = msra if stride_in_1x1 is None else stride_in_1x1
    if stride_in_1x1 is None and verbose:
      print(
        f"note: detectron2 files do not record STRIDE_IN_1X1; assuming {stride} "
        "(pass --stride-in-1x1 true/false to be explicit)"
      )

  variables, used, sources = d2_to_variables(d2, origin, norm, src_kind)
  template = _template(depth, norm, stride, groups, width_per_group)
  _check_against_template(variables, template, lambda p: sources.get(p, "?"))
  meta = {
    "depth": depth,
    "norm": norm,
    "stride_in_1x1": bool(stride),
    "width": 64,
    "groups": groups,
    "width_per_group": width_per_group,
    "num_groups": 32,
    "pixel_mean": pixel_mean,
    "pixel_std": pixel_std,
    "input_format": fmt,
    "source": source,
    "sha256": sha256_file(path),
    "input": os.path.basename(path),
    "source_norm": src_kind,
    "bn_eps": BN_EPS,
    "used": [f"{u[0]} {tuple(u[2])} -> {u[1]}" for u in used],
    "dropped": sorted(dropped),
  }
  if verbose:
    for line in meta["used"]:
      print("used   ", line)
    for k in meta["dropped"]:
      print("dropped", k, tuple(np.shape(sd[k])))
  return variables, meta


DETECTOR_SOURCES = ("detectron2", "torchvision")


def convert_detector(path: str, source: str, **options: Any) -> tuple[dict, Any, dict]:
  """A whole Mask R-CNN (or torchvision Keypoint R-CNN) checkpoint -> (variables, model_config,
  meta) of models.build_model.

  Args:
    path: "detectron2": a model-zoo .pkl ({"model": {name: ndarray}}) or .pth ({"model": {name:
      tensor}}); "torchvision": a state dict .pth.
    source: one of DETECTOR_SOURCES.
    options: the source's converter options; detectron2: d2_config (its config YAML), class_names.
  Raises:
    ConversionError naming the offending key and shapes (nothing is written).
  """
  if source not in DETECTOR_SOURCES:
    raise ConversionError(
      f"Unknown detector source {source!r}; expected one of {DETECTOR_SOURCES}."
    )
  state_dict = read_state_dict(path)
  if source == "detectron2":
    from rethink_jax import zoo_detectron2  # pylint: disable=g-import-not-at-top

    return zoo_detectron2.convert(state_dict, path, **options)
  # source == "torchvision": rethink_jax/zoo_torchvision.py, convert(state_dict, path, **options).
  try:
    from rethink_jax import zoo_torchvision  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError("torchvision: not available") from e
  return zoo_torchvision.convert(state_dict, path, **options)


def detector_main(args: argparse.Namespace) -> int:
  """`--detector`: converts a whole detector and writes a detector checkpoint directory."""
  from rethink_jax import detector_checkpoint  # pylint: disable=g-import-not-at-top

  try:
    if args.source not in DETECTOR_SOURCES:
      raise ConversionError(
        f"--detector --source {args.source!r}: must be one of {DETECTOR_SOURCES}"
      )
    if os.path.exists(args.output) and not args.overwrite:
      raise ConversionError(f"{args.output} exists; pass --overwrite to replace it.")
    options = {}
    if args.d2_config is not None:
      if args.source != "detectron2":
        raise ConversionError("--d2-config goes with --source detectron2 only")
      options["d2_config"] = args.d2_config
    variables, model_config, meta = convert_detector(args.input, args.source, **options)
    out = detector_checkpoint.save_detector(
      args.output, variables, model_config, meta, overwrite=args.overwrite
    )
  except (ConversionError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  c = model_config
  kind = "Keypoint R-CNN" if c.get("keypoint_on") and not c.get("mask_on", True) else "Mask R-CNN"
  print(
    f"wrote {out}: {args.source} {kind} R{c.backbone.depth}-FPN norm={c.backbone.norm} "
    f"box_head={c.box_head.name} classes={c.num_classes} input={c.input.format} "
    f"({len(meta.get('used', []))} tensors used, {len(meta.get('dropped', []))} dropped)"
  )
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m rethink_jax.convert",
    description="Convert a pretrained ResNet (or, with --detector, a whole Mask R-CNN) into a "
    "rethink_jax checkpoint directory.",
  )
  parser.add_argument(
    "--detector",
    action="store_true",
    help="convert a whole Mask R-CNN (writes a detector checkpoint directory)",
  )
  parser.add_argument(
    "--source", required=True, help=f"one of {SOURCES}; with --detector {DETECTOR_SOURCES}"
  )
  parser.add_argument("--input", required=True, help=".pth / .safetensors / .pkl file")
  parser.add_argument("--output", required=True, help="output directory (written atomically)")
  parser.add_argument("--depth", type=int, default=None, help="checked against the file")
  parser.add_argument("--norm", default=None, help="FrozenBN (default for BN), BN, SyncBN, GN")
  parser.add_argument(
    "--stride-in-1x1",
    default=None,
    choices=("true", "false"),
    help="detectron2 source only (the file does not say)",
  )
  parser.add_argument(
    "--input-format",
    default=None,
    choices=("RGB", "BGR"),
    help="detectron2 source only (default BGR, Detectron2's INPUT.FORMAT)",
  )
  parser.add_argument(
    "--d2-config", default=None, help="--detector --source detectron2: its config YAML"
  )
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  args = parser.parse_args(argv)
  if args.detector:
    return detector_main(args)
  try:
    if os.path.exists(args.output) and not args.overwrite:
      raise ConversionError(f"{args.output} exists; pass --overwrite to replace it.")
    stride = None if args.stride_in_1x1 is None else args.stride_in_1x1 == "true"
    variables, meta = convert_backbone(
      args.input,
      args.source,
      depth=args.depth,
      norm=args.norm,
      stride_in_1x1=stride,
      input_format=args.input_format,
      verbose=True,
    )
    out = save_backbone(args.output, variables, meta, overwrite=args.overwrite)
  except (ConversionError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  groups = f" groups={meta['groups']}x{meta['width_per_group']}d" if meta["groups"] > 1 else ""
  print(
    f"wrote {out}: ResNet-{meta['depth']}{groups} norm={meta['norm']} "
    f"stride_in_1x1={meta['stride_in_1x1']} input_format={meta['input_format']} "
    f"pixel_mean={meta['pixel_mean']} pixel_std={meta['pixel_std']} "
    f"({len(meta['used'])} tensors used, {len(meta['dropped'])} dropped)"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
