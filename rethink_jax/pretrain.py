"""The "ImageNet" pre-training arm of the demo: a ResNet classifier on shapes_classification.

A classification task on rethink_jax.trainer's skeleton (the same mesh, state, jitted step with
its finite check, shardings and logging as the detector's trainer). The classifier is
rethink_jax.models.ResNet (the detector backbone's depth, width, norm and stride placement) +
global average pooling of res5 + one linear layer, trained with SGD momentum (or AdamW) and
cross-entropy. The trained ResNet variables are written with rethink_jax.convert.save_backbone,
so the fine-tune arm loads them through `config.init_from` exactly as it loads converted ImageNet
weights.

Usage (normally called by rethink_jax.compare):
  meta = pretrain(pretrain_config(compare_config), workdir)   # writes workdir/backbone
"""

from __future__ import annotations

from collections.abc import Iterator
import functools
import os
import time
from typing import Any

from clu import parameter_overview
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rethink_jax import optim
from rethink_jax import trainer


def _log(msg: str) -> None:
  trainer.log(msg, "pretrain")


# --------------------------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------------------------
def default_pretrain_config() -> ml_collections.ConfigDict:
  """Pre-training hyper-parameters; `pretrain_config` fills model and pixel fields from a detector
  config."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(
    dict(
      name="shapes_classification",
      data_dir=None,
      builder_config="demo",
      builder_overrides={},
      train_split="train",
      eval_split="validation",
      image_size=64,
      flip_prob=0.5,
      pixel_mean=(123.675, 116.28, 103.53),
      pixel_std=(58.395, 57.12, 57.375),
      input_format="RGB",
      shuffle_buffer=2048,
      max_eval_images=0,
    )
  )
  c.model = ml_collections.ConfigDict(
    dict(depth=18, norm="GN", num_groups=32, stride_in_1x1=False, width=16, bn_group_size=0)
  )
  c.optimizer = "sgd"  # "sgd" (momentum) or "adamw" (converges faster on tiny budgets)
  c.batch_size = 64  # global
  c.steps = 300
  c.base_lr = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4  # not applied to norm parameters and biases
  c.warmup_steps = 50
  c.grad_clip_norm = 0.0  # 0 = off
  c.label_smoothing = 0.0
  c.log_every = 25
  c.seed = 0
  return c


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The pre-training config of a compare config: backbone and pixel format from the detector
  (config.model.backbone, config.data), the rest from config.compare.pretrain over the defaults.

  config.compare.pretrain may only set fields the defaults have (a misspelt one raises), except
  inside data.builder_overrides, which names fields of the dataset's builder config.
  """
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
    c.lock()
    c.data.builder_overrides.unlock()
    c.update(over)
    c.unlock()
  return c


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
      depth=self.depth,
      norm=self.norm,
      stride_in_1x1=self.stride_in_1x1,
      freeze_at=0,
      num_groups=self.num_groups,
      width=self.width,
      bn_group_size=self.bn_group_size,
      name="resnet",
    )(x, train=train)
    pooled = jnp.mean(feats["res5"].astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name="head", kernel_init=nn.initializers.normal(0.01))(pooled)


def build_classifier(model_config: ml_collections.ConfigDict, num_classes: int) -> Classifier:
  if model_config.norm == "FrozenBN":
    raise ValueError("pre-training needs a trainable norm (GN, BN, SyncBN or none), not FrozenBN")
  return Classifier(
    num_classes=num_classes,
    depth=model_config.depth,
    norm=model_config.norm,
    num_groups=model_config.num_groups,
    stride_in_1x1=model_config.stride_in_1x1,
    width=model_config.width,
    bn_group_size=model_config.bn_group_size or None,
  )


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
          download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
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
  ds = ds.map(
    lambda ex: {
      "image": _normalize(ex["image"], data_config),
      "label": tf.cast(ex["label"], tf.int32),
    },
    num_parallel_calls=tf.data.AUTOTUNE,
  ).cache()
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
  ds = ds.map(
    lambda ex: {
      "image": _normalize(ex["image"], data_config),
      "label": tf.cast(ex["label"], tf.int32),
    },
    num_parallel_calls=tf.data.AUTOTUNE,
  ).batch(batch_size_per_process)
  for b in tfds.as_numpy(ds):
    n = b["label"].shape[0]
    pad = batch_size_per_process - n
    yield {
      "image": np.pad(b["image"], ((0, pad), (0, 0), (0, 0), (0, 0))),
      "label": np.pad(b["label"], (0, pad)),
      "valid": np.arange(batch_size_per_process) < n,
    }


# --------------------------------------------------------------------------------------------
# The classification task: optimizer, init, loss, predict.
# --------------------------------------------------------------------------------------------
def _decay_mask(params):
  """True for conv/dense weights; False for norm parameters and biases (no weight decay)."""
  return jax.tree_util.tree_map(lambda label: label == "weight", optim.param_labels(params))


def make_optimizer(c: ml_collections.ConfigDict):
  """(tx, lr_fn): SGD momentum (or AdamW), linear warmup then cosine decay; no weight decay on
  norm parameters and biases."""
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=c.base_lr * 0.01,
    peak_value=c.base_lr,
    warmup_steps=max(1, c.warmup_steps),
    decay_steps=max(c.steps, c.warmup_steps + 1),
    end_value=0.0,
  )
  parts = []
  if c.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(c.grad_clip_norm))
  if c.get("optimizer", "sgd") == "adamw":
    parts.append(optax.adamw(schedule, weight_decay=c.weight_decay, mask=_decay_mask))
  elif c.get("optimizer", "sgd") == "sgd":
    parts += [
      optax.add_decayed_weights(c.weight_decay, mask=_decay_mask),
      optax.sgd(schedule, momentum=c.momentum),
    ]
  else:
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {c.optimizer!r}")
  return optax.chain(*parts), schedule


def _init_variables(model, rngs, batch):
  return model.init(rngs, batch["image"], train=False)


def _loss(model, params, collections, batch, rng, *, num_classes, label_smoothing):
  """Cross-entropy of a batch {image (B, S, S, 3), label (B,)}; metrics loss and accuracy."""
  del rng
  logits, new_coll = model.apply(
    {"params": params, **collections}, batch["image"], train=True, mutable=["batch_stats"]
  )
  logits = logits.astype(jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), label_smoothing)
  loss = optax.softmax_cross_entropy(logits, targets).mean()
  acc = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
  return loss, ({"loss": loss, "accuracy": acc}, new_coll)


def _predict(model, variables, batch):
  """The predicted class of each image: {"label": (B,) int32}."""
  logits = model.apply(variables, batch["image"], train=False)
  return {"label": jnp.argmax(logits, -1).astype(jnp.int32)}


# --------------------------------------------------------------------------------------------
# Loop.
# --------------------------------------------------------------------------------------------
def pretrain(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pre-trains the classifier and writes the ResNet to workdir/backbone (save_backbone).

  Returns the backbone's meta dict (depth, norm, ..., top1 accuracy in percent, steps).
  Raises trainer.NonFiniteLossError (a FloatingPointError) when a loss is not finite.
  """
  from rethink_jax import convert  # pylint: disable=g-import-not-at-top

  t_start = time.time()
  mesh = trainer.make_mesh()
  n_dev = jax.device_count()
  if c.batch_size % n_dev:
    raise ValueError(f"batch_size {c.batch_size} is not divisible by {n_dev} devices")
  per_process = c.batch_size // jax.process_count()

  _log(f"preparing {c.data.name} (data_dir={c.data.data_dir or 'default'})")
  builder = _builder(c.data)
  num_classes = builder.info.features["label"].num_classes
  n_train = builder.info.splits[c.data.train_split].num_examples
  _log(f"{n_train} training images, {num_classes} classes (chance {100 / num_classes:.1f}%)")

  size = int(c.data.image_size)
  sample = {"image": np.zeros((1, size, size, 3), np.float32), "label": np.zeros((1,), np.int32)}
  parts = trainer.build(
    build_classifier(c.model, num_classes),
    mesh,
    sample,
    init_variables=_init_variables,
    loss_fn=functools.partial(_loss, num_classes=num_classes, label_smoothing=c.label_smoothing),
    make_optimizer=lambda _: make_optimizer(c),
    predict=_predict,
  )
  t0 = time.time()
  state = parts.init(jax.random.PRNGKey(c.seed), sample)
  _log(f"initialized in {time.time() - t0:.0f} s")
  n_params = parameter_overview.count_parameters(state["params"]["resnet"])
  _log(
    f"ResNet-{c.model.depth} width {c.model.width} norm {c.model.norm}: {n_params:,} "
    f"backbone parameters; {c.steps} steps at batch {c.batch_size} on {n_dev} devices"
  )

  def describe_bad_step(bad, m):
    return (
      f"pre-training loss or gradient is not finite at step {bad + 1} (loss "
      f"{float(m['loss'])} at the last step); training stopped"
    )

  it = train_iterator(c.data, builder, per_process, seed=c.seed + jax.process_index())
  pending, t_log, step_log = [], time.time(), 0
  history = []
  for step in range(1, c.steps + 1):
    state, metrics = parts.train_step(state, trainer.to_global(next(it), parts.batch_sharding))
    pending.append(metrics)
    if step % c.log_every == 0 or step == c.steps:
      trainer.check_finite(metrics, describe_bad_step)
      m = jax.device_get(pending)
      loss = float(np.mean([x["loss"] for x in m]))
      acc = float(np.mean([x["accuracy"] for x in m]))
      now = time.time()
      rate = (step - step_log) / max(now - t_log, 1e-9)
      eta = (c.steps - step) / max(rate, 1e-9)
      _log(
        f"step {step}/{c.steps}  loss {loss:.3f}  train acc {100 * acc:.1f}%  "
        f"{rate:.2f} steps/s  ETA {eta / 60:.1f} min"
      )
      history.append({"step": step, "loss": loss, "accuracy": 100 * acc})
      pending, t_log, step_log = [], now, step

  variables = trainer.variables_of(state)
  correct = total = 0
  for b in eval_batches(c.data, builder, per_process):
    predicted = parts.predict_fn(variables, b)["label"]
    correct += int(np.sum((predicted == b["label"]) & b["valid"]))
    total += int(np.sum(b["valid"]))
  # Every process counted its own shard of the split.
  correct, total = (
    np.asarray(multihost_utils.process_allgather(np.asarray([correct, total])))
    .reshape(-1, 2)
    .sum(0)
  )
  top1 = 100.0 * float(correct) / max(int(total), 1)
  _log(
    f"top-1 on {c.data.eval_split} ({total} images): {top1:.1f}% (chance {100 / num_classes:.1f}%)"
  )

  resnet_vars = {"params": state["params"]["resnet"]}
  batch_stats = state["collections"].get("batch_stats", {})
  if jax.tree_util.tree_leaves(batch_stats):
    resnet_vars["batch_stats"] = batch_stats["resnet"]
  resnet_vars = jax.device_get(resnet_vars)
  meta = {
    "depth": int(c.model.depth),
    "norm": c.model.norm,
    "num_groups": int(c.model.num_groups),
    "stride_in_1x1": bool(c.model.stride_in_1x1),
    "width": int(c.model.width),
    "pixel_mean": [float(x) for x in c.data.pixel_mean],
    "pixel_std": [float(x) for x in c.data.pixel_std],
    "input_format": c.data.input_format,
    "source": f"pretrain:{c.data.name}",
    "sha256": None,
    "top1": top1,
    "num_classes": int(num_classes),
    "steps": int(c.steps),
    "batch_size": int(c.batch_size),
    "image_size": size,
    "train_history": history,
    "wall_s": time.time() - t_start,
  }
  out = os.path.join(workdir, "backbone")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    convert.save_backbone(out, resnet_vars, meta)
    _log(f"saved the backbone to {out} ({meta['wall_s'] / 60:.1f} min)")
  return meta
