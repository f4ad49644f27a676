"""The "ImageNet" pre-training arm of the embedded demo: a ResNet classifier on shapes_classification.

The classifier is rethink_jax.models.ResNet (the detector backbone's depth, width, norm and stride
placement) + global average pooling of res5 + one linear layer, trained with SGD momentum and
cross-entropy under one jax.jit step on a data-parallel mesh (the global batch sharded on the "data"
axis, parameters and optimizer state replicated), like the detector's trainer. The trained ResNet
variables are written with rethink_jax.convert.save_backbone, so the fine-tune arm loads them through
`config.init_from` exactly as it loads converted ImageNet weights.

Usage (normally called by rethink_jax.compare):
  meta = pretrain(pretrain_config(compare_config), workdir)   # writes workdir/backbone
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _log(msg: str) -> None:
  print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------------------------
def default_pretrain_config() -> ml_collections.ConfigDict:
  """Pre-training hyper-parameters; `pretrain_config` fills model and pixel fields from a detector
  config."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      name="shapes_classification", data_dir=None, builder_config="demo", builder_overrides={},
      train_split="train",
      eval_split="validation", image_size=64, flip_prob=0.5, pixel_mean=(123.675, 116.28, 103.53),
      pixel_std=(58.395, 57.12, 57.375), input_format="RGB", shuffle_buffer=2048,
      max_eval_images=0))
  c.model = ml_collections.ConfigDict(dict(
      depth=18, norm="GN", num_groups=32, stride_in_1x1=False, width=16, bn_group_size=0))
  c.optimizer = "sgd"         # "sgd" (momentum) or "adamw" (converges faster on tiny budgets)
  c.batch_size = 64           # global
  c.steps = 300
  c.base_lr = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4       # not applied to norm parameters and biases
  c.warmup_steps = 50
  c.grad_clip_norm = 0.0      # 0 = off
  c.label_smoothing = 0.0
  c.log_every = 25
  c.seed = 0
  return c


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The pre-training config of a compare config: backbone and pixel format from the detector
  (config.model.backbone, config.data), the rest from config.compare.pretrain over the defaults."""
  c = default_pretrain_config()
  bb = config.model.backbone
  for k in ("depth", "norm", "num_groups", "stride_in_1x1", "width", "bn_group_size"):
    if k in bb:
      c.model[k] = bb[k]
  for k in ("pixel_mean", "pixel_std", "input_format", "data_dir"):
    if k in config.data:
      c.data[k] = config.data[k]
  over = config.compare.get("pretrain", None)
  if over is not None:
    c.update_from_flattened_dict({k: v for k, v in _flatten(over.to_dict()).items()})
  return c


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and k != "builder_overrides":
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# --------------------------------------------------------------------------------------------
# Model.
# --------------------------------------------------------------------------------------------
class Classifier(nn.Module):
  """ResNet + global average pooling of res5 + linear classifier.

  __call__(x (B, H, W, 3) float32, train) -> logits (B, num_classes) float32.
  The ResNet's variables sit under "resnet" (the tree save_backbone writes), the linear layer
  under "head".
  """
  num_classes: int
  depth: int = 18
  norm: str = "GN"
  num_groups: int = 32
  stride_in_1x1: bool = False
  width: int = 64
  bn_group_size: int | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"Classifier expects images (B, H, W, 3), got {x.shape}")
    from rethink_jax.models import resnet as resnet_lib  # pylint: disable=g-import-not-at-top
    feats = resnet_lib.build_resnet(
        depth=self.depth, norm=self.norm, stride_in_1x1=self.stride_in_1x1, freeze_at=0,
        num_groups=self.num_groups, width=self.width, bn_group_size=self.bn_group_size,
        name="resnet")(x, train=train)
    pooled = jnp.mean(feats["res5"].astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name="head",
                    kernel_init=nn.initializers.normal(0.01))(pooled)


def build_classifier(model_config: ml_collections.ConfigDict, num_classes: int) -> Classifier:
  if model_config.norm == "FrozenBN":
    raise ValueError("pre-training needs a trainable norm (GN, BN, SyncBN or none), not FrozenBN")
  return Classifier(num_classes=num_classes, depth=model_config.depth, norm=model_config.norm,
                    num_groups=model_config.num_groups, stride_in_1x1=model_config.stride_in_1x1,
                    width=model_config.width, bn_group_size=model_config.bn_group_size or None)


# --------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------
def _builder(data_config):
  """The prepared tfds builder of the classification set (generated offline on first use).

  data_config.builder_config names a builder config ("tiny", "demo"); builder_overrides (dict,
  e.g. {"num_train": 2000, "image_size": 64}) derives a new config from it under its own name.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  import fcntl  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top
  if data_config.name != "shapes_classification":
    raise ValueError(f"pre-training reads shapes_classification, got {data_config.name!r}")
  cls = shapes.ShapesClassification
  config = cls.builder_configs[data_config.builder_config]
  overrides = dict(data_config.get("builder_overrides") or {})
  if overrides:
    tag = "_".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    config = dataclasses.replace(config, name=f"{config.name}_{tag}", **overrides)
  data_dir = data_config.get("data_dir") or None
  builder = cls(config=config, data_dir=data_dir)
  if not builder.is_prepared():
    os.makedirs(builder.data_dir_root, exist_ok=True)
    # A lock: two arms (or tests) started at once generate the set only once.
    with open(os.path.join(builder.data_dir_root, ".shapes_classification.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      builder = cls(config=config, data_dir=data_dir)
      if not builder.is_prepared():
        t0 = time.time()
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        _log(f"generated {builder.info.full_name} in {time.time() - t0:.0f} s")
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder


def _normalize(image, data_config):
  """uint8 (H, W, 3) RGB -> float32 normalized in input_format order, resized to image_size."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  size = int(data_config.image_size)
  image = tf.cast(image, tf.float32)
  if image.shape[0] != size or image.shape[1] != size:
    image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
  if data_config.input_format == "BGR":
    image = image[..., ::-1]
  mean = tf.constant(data_config.pixel_mean, tf.float32)
  std = tf.constant(data_config.pixel_std, tf.float32)
  return (image - mean) / std


def train_iterator(data_config, builder, batch_size_per_process: int, seed: int) -> Iterator[dict]:
  """Endless iterator of {"image" (b, S, S, 3) float32, "label" (b,) int32} (b = per process).

  Each process reads its own shard of the train split (tfds.split_for_jax_process).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split = tfds.split_for_jax_process(data_config.train_split)
  # Read in order (the set is small and cached); shuffling happens after the cache.
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(lambda ex: {"image": _normalize(ex["image"], data_config),
                          "label": tf.cast(ex["label"], tf.int32)},
              num_parallel_calls=tf.data.AUTOTUNE).cache()
  ds = ds.repeat().shuffle(data_config.shuffle_buffer, seed=seed)
  flip = float(data_config.flip_prob)

  def augment(ex, key):
    do = tf.random.stateless_uniform((), key) < flip
    ex["image"] = tf.cond(do, lambda: ex["image"][:, ::-1], lambda: ex["image"])
    return ex
  keys = tf.data.Dataset.random(seed=seed).batch(2).map(lambda k: tf.cast(k, tf.int64))
  ds = tf.data.Dataset.zip((ds, keys)).map(augment, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size_per_process, drop_remainder=True).prefetch(2)
  return iter(tfds.as_numpy(ds))


def eval_batches(data_config, builder, batch_size_per_process: int) -> Iterator[dict]:
  """Finite iterator over this process's shard of the eval split, padded to full batches:
  {"image" (b, S, S, 3), "label" (b,), "valid" (b,) bool}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split = tfds.split_for_jax_process(data_config.eval_split)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  if data_config.max_eval_images:
    ds = ds.take(data_config.max_eval_images)
  ds = ds.map(lambda ex: {"image": _normalize(ex["image"], data_config),
                          "label": tf.cast(ex["label"], tf.int32)},
              num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size_per_process)
  for b in tfds.as_numpy(ds):
    n = b["label"].shape[0]
    pad = batch_size_per_process - n
    yield {"image": np.pad(b["image"], ((0, pad), (0, 0), (0, 0), (0, 0))),
           "label": np.pad(b["label"], (0, pad)),
           "valid": np.arange(batch_size_per_process) < n}


# --------------------------------------------------------------------------------------------
# Optimizer and steps.
# --------------------------------------------------------------------------------------------
def _decay_mask(params):
  """True for conv/dense kernels; False for norm parameters and biases (no weight decay)."""
  def keep(path, _):
    names = [getattr(p, "key", str(p)) for p in path]
    return names[-1] == "kernel" and "norm" not in names
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD momentum (or AdamW), linear warmup then cosine decay; no weight decay on norm
  parameters and biases."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=c.base_lr * 0.01, peak_value=c.base_lr, warmup_steps=max(1, c.warmup_steps),
      decay_steps=max(c.steps, c.warmup_steps + 1), end_value=0.0)
  parts = []
  if c.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(c.grad_clip_norm))
  if c.get("optimizer", "sgd") == "adamw":
    parts.append(optax.adamw(schedule, weight_decay=c.weight_decay, mask=_decay_mask))
  elif c.get("optimizer", "sgd") == "sgd":
    parts += [optax.add_decayed_weights(c.weight_decay, mask=_decay_mask),
              optax.sgd(schedule, momentum=c.momentum)]
  else:
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {c.optimizer!r}")
  return optax.chain(*parts)


def _train_step(state, batch, *, model, tx, label_smoothing, num_classes):
  """One SGD step. state: {"params", "batch_stats" (maybe empty), "opt_state"}; batch: image
  (B, S, S, 3), label (B,). Returns (new state, metrics {loss, accuracy})."""
  has_bs = bool(jax.tree_util.tree_leaves(state["batch_stats"]))

  def loss_fn(params):
    variables = {"params": params}
    if has_bs:
      variables["batch_stats"] = state["batch_stats"]
      logits, new_vars = model.apply(variables, batch["image"], train=True,
                                     mutable=["batch_stats"])
      new_bs = new_vars["batch_stats"]
    else:
      logits, new_bs = model.apply(variables, batch["image"], train=True), state["batch_stats"]
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), label_smoothing)
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
    return loss, (logits, new_bs)

  (loss, (logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  acc = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
  return ({"params": params, "batch_stats": new_bs, "opt_state": opt_state},
          {"loss": loss, "accuracy": acc})


def _eval_step(state, batch, *, model):
  """Correct and counted images of a padded eval batch (valid (B,) bool)."""
  variables = {"params": state["params"]}
  if jax.tree_util.tree_leaves(state["batch_stats"]):
    variables["batch_stats"] = state["batch_stats"]
  logits = model.apply(variables, batch["image"], train=False)
  correct = (jnp.argmax(logits, -1) == batch["label"]) & batch["valid"]
  return jnp.sum(correct.astype(jnp.int32)), jnp.sum(batch["valid"].astype(jnp.int32))


# --------------------------------------------------------------------------------------------
# Loop.
# --------------------------------------------------------------------------------------------
def pretrain(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pre-trains the classifier and writes the ResNet to workdir/backbone (save_backbone).

  Returns the backbone's meta dict (depth, norm, ..., top1 accuracy in percent, steps).
  """
  from rethink_jax import convert  # pylint: disable=g-import-not-at-top
  t_start = time.time()
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("data",))
  if c.batch_size % len(devices):
    raise ValueError(f"batch_size {c.batch_size} is not divisible by {len(devices)} devices")
  per_process = c.batch_size // jax.process_count()
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  _log(f"preparing {c.data.name} (data_dir={c.data.data_dir or 'default'})")
  builder = _builder(c.data)
  num_classes = builder.info.features["label"].num_classes
  n_train = builder.info.splits[c.data.train_split].num_examples
  _log(f"{n_train} training images, {num_classes} classes (chance {100 / num_classes:.1f}%)")

  model = build_classifier(c.model, num_classes)
  size = int(c.data.image_size)
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  t0 = time.time()
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(c.seed), dummy)
  _log(f"initialized in {time.time() - t0:.0f} s")
  tx = make_optimizer(c)
  state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
           "opt_state": tx.init(variables["params"])}
  state = jax.device_put(state, replicated)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]["resnet"]))
  _log(f"ResNet-{c.model.depth} width {c.model.width} norm {c.model.norm}: {n_params:,} "
       f"backbone parameters; {c.steps} steps at batch {c.batch_size} on {len(devices)} devices")

  train_step = jax.jit(
      functools.partial(_train_step, model=model, tx=tx, label_smoothing=c.label_smoothing,
                        num_classes=num_classes),
      in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
      donate_argnums=(0,))
  eval_step = jax.jit(functools.partial(_eval_step, model=model),
                      in_shardings=(replicated, data_sharding), out_shardings=replicated)

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in batch.items()}

  it = train_iterator(c.data, builder, per_process, seed=c.seed + jax.process_index())
  pending, t_log, step_log = [], time.time(), 0
  history = []
  for step in range(1, c.steps + 1):
    state, metrics = train_step(state, to_global(next(it)))
    pending.append(metrics)
    if step % c.log_every == 0 or step == c.steps:
      m = jax.device_get(pending)
      loss = float(np.mean([x["loss"] for x in m]))
      acc = float(np.mean([x["accuracy"] for x in m]))
      if not math.isfinite(loss):
        raise FloatingPointError(f"pre-training loss is {loss} at step {step}")
      now = time.time()
      rate = (step - step_log) / max(now - t_log, 1e-9)
      eta = (c.steps - step) / max(rate, 1e-9)
      _log(f"step {step}/{c.steps}  loss {loss:.3f}  train acc {100 * acc:.1f}%  "
           f"{rate:.2f} steps/s  ETA {eta / 60:.1f} min")
      history.append({"step": step, "loss": loss, "accuracy": 100 * acc})
      pending, t_log, step_log = [], now, step

  correct = total = 0
  for b in eval_batches(c.data, builder, per_process):
    k, n = jax.device_get(eval_step(state, to_global(b)))
    correct, total = correct + int(k), total + int(n)
  top1 = 100.0 * correct / max(total, 1)
  _log(f"top-1 on {c.data.eval_split} ({total} images): {top1:.1f}% "
       f"(chance {100 / num_classes:.1f}%)")

  resnet_vars = {"params": state["params"]["resnet"]}
  if jax.tree_util.tree_leaves(state["batch_stats"]):
    resnet_vars["batch_stats"] = state["batch_stats"]["resnet"]
  resnet_vars = jax.device_get(resnet_vars)
  meta = {
      "depth": int(c.model.depth), "norm": c.model.norm, "num_groups": int(c.model.num_groups),
      "stride_in_1x1": bool(c.model.stride_in_1x1), "width": int(c.model.width),
      "pixel_mean": [float(x) for x in c.data.pixel_mean],
      "pixel_std": [float(x) for x in c.data.pixel_std],
      "input_format": c.data.input_format, "source": f"pretrain:{c.data.name}", "sha256": None,
      "top1": top1, "num_classes": int(num_classes), "steps": int(c.steps),
      "batch_size": int(c.batch_size), "image_size": size,
      "train_history": history, "wall_s": time.time() - t_start,
  }
  out = os.path.join(workdir, "backbone")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    convert.save_backbone(out, resnet_vars, meta)
    _log(f"saved the backbone to {out} ({meta['wall_s'] / 60:.1f} min)")
  return meta
