"""Times R50-FPN-GN Mask R-CNN: this project's Flax model vs torchvision's, same architecture.

  timeout 1500 nice .venv/bin/python scripts/benchmark_model.py \
      [--size 512 --batch 2 --steps 3 --rounds 1]
  python3 scripts/benchmark_model.py --device cuda --size 1024 --steps 20   # on a GPU machine
  ... --frameworks jax --set mask_head.chunk_rois=0                          # a model variant
  ... --modes predict --images 3                      # model-zoo inference at 800 x 1333

One training step = forward + backward + SGD (momentum 0.9) update, batch `--batch` at
size x size; inference = one image. The JAX side is the trainer's own jitted train step and
predict (rethink_jax.train.build_parts: its state, NaN bookkeeping, shardings and donation) on
one device; its optimizer is torchvision's here (SGD, LR 0.02, momentum 0.9, no weight decay).
`--set KEY=VALUE` overrides a field of the JAX model config (ml_collections' config_flags parse
it as --model.KEY=VALUE). Each of the four measurements runs in its own process, so each
peak resident set size (ru_maxrss) belongs to that measurement alone. Prints medians, the ratio
JAX / torch (< 1 means JAX is faster), the compile time of the jitted JAX functions, and peak RSS
(on a GPU also each framework's peak device memory: JAX's allocator statistics,
torch.cuda.max_memory_allocated).

`--modes predict` times a model-zoo detector end to end, per image: torchvision's
maskrcnn_resnet50_fpn (FrozenBN, 2fc; seeded random weights with one class's score bias raised so
that ~100 detections reach the mask head and the paste, as a COCO-trained model's do) called on
one uint8 800 x 1333 image (its transform, model and postprocess with mask pasting), against
the same weights converted by `rethink_jax.convert.convert_detector(..., "torchvision")` in
`rethink_jax.predict.Predictor` (its resize rule, a shape bucket, the model, mask pasting).

torchvision's model for train / infer: torchvision.models.detection.MaskRCNN on a ResNet-50 with
GroupNorm(32) everywhere, FPN with GroupNorm (_resnet_fpn_extractor(norm_layer=GN)),
FastRCNNConvFCHead 4conv1fc with GN, MaskRCNNHeads with GN, 81 classes (80 + background), RPN
post-NMS top 1000 in training (Detectron2's value; torchvision's default is 2000), and RoIAlign
poolers with sampling_ratio 0 (adaptive, ceil(roi size / bins) samples per bin: Detectron2's
POOLER_SAMPLING_RATIO, which the JAX model uses; torchvision's default is 2, a fixed 2 x 2 grid:
`--torch-sampling-ratio 2`, beside `--set box_head.pooler_sampling_ratio=2 --set
mask_head.pooler_sampling_ratio=2` for the JAX model).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

NUM_CLASSES = 80


def synthetic(size, batch, num_instances=8, seed=0):
  """Images (B, S, S, 3) float32, boxes (B, G, 4), classes (B, G) 1..80, full masks (B, G, S, S)."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  xy = rng.uniform(0, size * 0.6, (batch, num_instances, 2))
  wh = rng.uniform(size * 0.05, size * 0.4, (batch, num_instances, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, size - 1)], -1).astype(np.float32)
  classes = rng.integers(1, NUM_CLASSES + 1, (batch, num_instances)).astype(np.int32)
  yy, xx = np.mgrid[:size, :size] + 0.5
  masks = np.zeros((batch, num_instances, size, size), np.uint8)
  for b in range(batch):
    for g in range(num_instances):
      x1, y1, x2, y2 = boxes[b, g]
      masks[b, g] = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
  return images, boxes, classes, masks


def _timed(fn, steps):
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


# ------------------------------------------------------------------------------------------------
# JAX
# ------------------------------------------------------------------------------------------------
def jax_batch(size, batch):
  """The synthetic batch as the model's input dict (masks as 112 x 112 crops of their boxes)."""
  from rethink_jax.ops.masks import crop_masks_to_boxes

  images, boxes, classes, masks = synthetic(size, batch)
  crops = np.stack([np.asarray(crop_masks_to_boxes(masks[i], boxes[i], 112)) for i in range(batch)])
  return {
    "image": images,
    "image_hw": np.full((batch, 2), size, np.int32),
    "gt_boxes": boxes,
    "gt_classes": classes,
    "gt_masks": crops,
  }


def model_config_with(overrides=()):
  """The default R50-FPN-GN model config with `overrides` ("key.sub=value") applied by
  ml_collections' config_flags (as the flags --model.key.sub=value)."""
  from absl import flags
  from ml_collections import config_flags

  from rethink_jax.models import default_model_config

  argv = ["benchmark_model"] + [f"--model.{item}" for item in overrides]
  flag_values = flags.FlagValues()
  model = config_flags.DEFINE_config_dict(
    "model", default_model_config(), flag_values=flag_values, sys_argv=argv
  )
  flag_values(argv)
  return model.value


def jax_train_config(overrides=(), batch=2):
  """The trainer's config for the benchmark: the model with `overrides`, and torchvision's side's
  optimizer (SGD, LR 0.02 at this batch, momentum 0.9, no weight decay, no warmup)."""
  import ml_collections

  c = ml_collections.ConfigDict()
  c.model = model_config_with(overrides)
  c.optim = ml_collections.ConfigDict(
    dict(
      base_lr=0.02,
      momentum=0.9,
      weight_decay=0.0,
      warmup_steps=0,
      warmup_factor=1.0,
      grad_clip_norm=0.0,
    )
  )
  c.schedule = ml_collections.ConfigDict(
    dict(multiple=1.0, base_batch_size=batch, total_steps=1, decay_steps=(), decay_factor=0.1)
  )
  return c


def jax_parts(size, batch, overrides=()):
  """The trainer's parts for a synthetic batch on one device: (parts, host batch, the batch
  on the device). parts: rethink_jax.train.build_parts's, the construction train.py uses."""
  import jax

  from rethink_jax import optim
  from rethink_jax import train
  from rethink_jax import trainer

  config = jax_train_config(overrides, batch)
  host = jax_batch(size, batch)
  mesh = trainer.make_mesh(jax.devices()[:1])
  sched = optim.resolve_schedule(config.schedule, config.optim, batch)
  parts = train.build_parts(config, sched, mesh, train.init_batch(host))
  return parts, host, jax.device_put(host, parts.batch_sharding)


def zoo_images(count, seed=0):
  """`count` uint8 RGB 800 x 1333 images: smooth random colour fields."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (count, 26, 42, 3)).astype(np.float32)
  images = coarse.repeat(32, axis=1)[:, :800].repeat(32, axis=2)[:, :, :1333]
  return images.astype(np.uint8)


def run_jax_predict(weights, count, steps):
  """The Predictor on the converted torchvision weights, one image per call."""
  from rethink_jax import convert
  from rethink_jax.predict import Predictor

  predictor = Predictor(*convert.convert_detector(weights, "torchvision"))
  images = list(zoo_images(count))
  detections = []

  def call():
    detections.append(len(predictor([images[len(detections) % count]])[0]["scores"]))

  t = time.perf_counter()
  call()
  first_s = time.perf_counter() - t
  out = {"times": _timed(call, steps), "compile_and_first_s": first_s}
  return dict(out, detections=detections[-1], compilations=predictor.compilations)


def run_jax(mode, size, batch, steps, overrides=()):
  import jax

  from rethink_jax import train
  from rethink_jax import trainer

  # The batch is put on the device once, as torch's.
  parts, host, data = jax_parts(size, batch if mode == "train" else 1, overrides)
  t = time.perf_counter()
  state = parts.init(jax.random.PRNGKey(0), train.init_batch(host))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t

  t = time.perf_counter()
  if mode == "train":
    step = parts.train_step.lower(state, data).compile()
    live = {"state": state}

    def call():  # the step donates its state: keep only the new one
      live["state"], metrics = step(live["state"], data)
      jax.block_until_ready(metrics)
  else:
    variables = trainer.variables_of(state)
    step = parts.predict.lower(variables, data).compile()
    detections = []

    def call():
      detections.append(int(jax.block_until_ready(step(variables, data))["num_detections"][0]))

  call()  # first run, after the compile
  first_s = time.perf_counter() - t
  out = {"times": _timed(call, steps), "compile_and_first_s": first_s, "init_s": init_s}
  if mode != "train":
    out["detections"] = detections[-1]
  memory = step.memory_analysis()
  if memory is not None:  # what the program needs: arguments + outputs - aliased + temporaries
    out["program_mb"] = (
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      - memory.alias_size_in_bytes
      + memory.temp_size_in_bytes
    ) / 2**20
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:  # GPU allocators report it (autotuning's scratch included)
    out["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
  return out


# ------------------------------------------------------------------------------------------------
# torchvision
# ------------------------------------------------------------------------------------------------
def build_torchvision(size, sampling_ratio=0):
  import functools

  import torch.nn as nn
  import torchvision
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
  from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
  from torchvision.models.detection.mask_rcnn import MaskRCNN
  from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
  from torchvision.ops import MultiScaleRoIAlign

  gn = functools.partial(nn.GroupNorm, 32)
  body = torchvision.models.resnet50(weights=None, norm_layer=gn)
  backbone = _resnet_fpn_extractor(body, trainable_layers=5, norm_layer=gn)
  box_head = FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=gn)
  mask_head = MaskRCNNHeads(256, [256] * 4, 1, norm_layer=gn)
  levels = ["0", "1", "2", "3"]  # P2..P5
  return MaskRCNN(
    backbone,
    num_classes=NUM_CLASSES + 1,
    min_size=size,
    max_size=size,
    rpn_post_nms_top_n_train=1000,
    box_head=box_head,
    mask_head=mask_head,
    box_roi_pool=MultiScaleRoIAlign(levels, 7, sampling_ratio),
    mask_roi_pool=MultiScaleRoIAlign(levels, 14, sampling_ratio),
  )


def torchvision_zoo_model(weights):
  """maskrcnn_resnet50_fpn with seeded random weights, saved to `weights` by the first caller and
  read by the next: one class's score bias raised so that detections fill the 100 slots, as a
  trained model's do."""
  import torch
  import torchvision

  torch.manual_seed(0)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(
    weights=None, weights_backbone=None, num_classes=91
  )
  if os.path.exists(weights):
    model.load_state_dict(torch.load(weights, weights_only=True))
  else:
    with torch.no_grad():
      model.roi_heads.box_predictor.cls_score.bias[1] = 8.0
    torch.save(model.state_dict(), weights)
  return model.eval()


def run_torch_predict(weights, count, steps, threads):
  import torch

  torch.set_num_threads(threads)
  model = torchvision_zoo_model(weights)
  images = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in zoo_images(count)]
  detections = []

  def call():
    with torch.no_grad():
      detections.append(len(model([images[len(detections) % count]])[0]["scores"]))

  t = time.perf_counter()
  call()
  first_s = time.perf_counter() - t
  return {
    "times": _timed(call, steps),
    "compile_and_first_s": first_s,
    "detections": detections[-1],
  }


def run_torch(mode, size, batch, steps, threads, device, sampling_ratio):
  import torch

  torch.set_num_threads(threads)
  dev = torch.device(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  images, boxes, classes, masks = synthetic(size, batch)
  model = build_torchvision(size, sampling_ratio).to(dev)
  nparams = sum(p.numel() for p in model.parameters())
  imgs = [torch.from_numpy(im).permute(2, 0, 1).contiguous().to(dev) for im in images]
  if mode == "train":
    targets = [
      {
        "boxes": torch.from_numpy(boxes[i]).to(dev),
        "labels": torch.from_numpy(classes[i]).long().to(dev),
        "masks": torch.from_numpy(masks[i]).to(dev),
      }
      for i in range(batch)
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()

    def call():
      losses = model(imgs, targets)
      loss = sum(losses.values())
      opt.zero_grad()
      loss.backward()
      opt.step()
      sync()
  else:
    model.eval()
    detections = []

    def call():
      with torch.no_grad():
        detections.append(len(model(imgs[:1])[0]["boxes"]))

  t = time.perf_counter()
  call()
  first_s = time.perf_counter() - t
  out = {"times": _timed(call, steps), "compile_and_first_s": first_s, "params": nparams}
  if mode != "train":
    out["detections"] = detections[-1]  # with random weights usually 0: no mask head runs
  if device == "cuda":
    out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
  return out


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def child(args):
  if args.mode == "predict" and args.framework == "jax":
    out = run_jax_predict(args.weights, args.images, args.steps)
  elif args.mode == "predict":
    out = run_torch_predict(args.weights, args.images, args.steps, args.threads)
  elif args.framework == "jax":
    out = run_jax(args.mode, args.size, args.batch, args.steps, args.set)
  else:
    out = run_torch(
      args.mode,
      args.size,
      args.batch,
      args.steps,
      args.threads,
      args.device,
      args.torch_sampling_ratio,
    )
  out["median_s"] = statistics.median(out["times"])
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print("RESULT " + json.dumps(out), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--steps", type=int, default=3, help="timed repetitions after the first call")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  p.add_argument("--modes", default="train,infer")
  p.add_argument(
    "--device",
    default="cpu",
    choices=["cpu", "cuda"],
    help="where both frameworks run (cuda: a GPU, with jax[cuda] installed)",
  )
  p.add_argument("--frameworks", default="torch,jax")
  p.add_argument(
    "--rounds",
    type=int,
    default=1,
    help="repeat the torch/jax pair of processes; the machine's speed drifts, so "
    "each round's ratio is printed and the table pools every round's times",
  )
  p.add_argument(
    "--torch-sampling-ratio",
    type=int,
    default=0,
    help="torchvision's RoIAlign sampling_ratio (0: adaptive, as the JAX model's "
    "Detectron2 default; torchvision's own default is 2)",
  )
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override a field of the JAX model config, e.g. mask_head.chunk_rois=0",
  )
  p.add_argument("--images", type=int, default=3, help="predict mode: distinct 800x1333 images")
  p.add_argument("--framework", choices=["jax", "torch"], help=argparse.SUPPRESS)
  p.add_argument("--mode", choices=["train", "infer", "predict"], help=argparse.SUPPRESS)
  p.add_argument("--weights", help=argparse.SUPPRESS)
  args = p.parse_args()
  from rethink_jax import runtime

  runtime.configure(hide_gpus_from_tf=False)  # TF is not used; torchvision must load before it
  if args.framework:
    return child(args)

  env = dict(os.environ, JAX_PLATFORMS=args.device, TF_CPP_MIN_LOG_LEVEL="2")
  weights_dir = tempfile.mkdtemp(prefix="benchmark_model-")  # the predict mode's shared weights
  results, round_medians = {}, {}
  runs = [
    (mode, fw)
    for _ in range(args.rounds)
    for mode in args.modes.split(",")
    for fw in args.frameworks.split(",")
  ]
  for mode, fw in runs:
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--framework",
      fw,
      "--mode",
      mode,
      "--size",
      str(args.size),
      "--batch",
      str(args.batch),
      "--steps",
      str(args.steps),
      "--threads",
      str(args.threads),
      "--device",
      args.device,
      "--torch-sampling-ratio",
      str(args.torch_sampling_ratio),
      "--images",
      str(args.images),
      "--weights",
      os.path.join(weights_dir, "maskrcnn_resnet50_fpn.pth"),
    ]
    cmd += [f"--set={item}" for item in args.set]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(f"{fw} {mode} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
      continue
    r = json.loads(lines[-1][len("RESULT ") :])
    if (fw, mode) in results:  # a later round: pool its times and keep the larger peaks
      old = results[(fw, mode)]
      r["times"] = old["times"] + r["times"]
      for k in ("peak_rss_mb", "peak_device_mb", "program_mb", "compile_and_first_s"):
        if k in old:
          r[k] = max(r[k], old[k])
    results[(fw, mode)] = r
    round_medians.setdefault((fw, mode), []).append(statistics.median(r["times"][-args.steps :]))
    detections = f"  detections {r['detections']}" if "detections" in r else ""
    device_mb = f"  peak device {r['peak_device_mb']:.0f} MB" if "peak_device_mb" in r else ""
    if "program_mb" in r:
      device_mb += f"  compiled program {r['program_mb']:.0f} MB"
    r["median_s"] = statistics.median(r["times"])
    print(
      f"{fw:5s} {mode:5s} median {r['median_s']:.3f} s  "
      f"first call {r['compile_and_first_s']:.1f} s  "
      f"peak RSS {r['peak_rss_mb']:.0f} MB{device_mb}  "
      f"times {[round(x, 3) for x in r['times']]}{detections}  "
      f"({time.perf_counter() - t:.0f} s wall)",
      flush=True,
    )

  where = f"CPU ({os.cpu_count()} cores)" if args.device == "cpu" else args.device
  variant = f", JAX model with {', '.join(args.set)}" if args.set else ""
  modes = args.modes.split(",")
  if modes != ["predict"]:
    print(
      f"\nR50-FPN-GN Mask R-CNN, {args.size}x{args.size}, {where}, "
      f"train batch {args.batch}, inference batch 1, {args.rounds} round(s) of {args.steps} "
      f"timed runs, torchvision RoIAlign sampling_ratio {args.torch_sampling_ratio}{variant}"
    )
  if "predict" in modes:
    print(
      f"\nmodel-zoo predict: maskrcnn_resnet50_fpn (FrozenBN, 2fc) on {args.images} uint8 "
      f"800x1333 images, one per call, {where}, {args.rounds} round(s) of {args.steps} timed runs"
    )
  print(
    "| measurement | torchvision (s) | rethink_jax (s) | ratio jax/torch | "
    "torch peak RSS (MB) | jax peak RSS (MB) | jax compile+first (s) |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for mode in args.modes.split(","):
    t, j = results.get(("torch", mode)), results.get(("jax", mode))
    fmt = lambda r, k, f: (f % r[k]) if r else "n/a"
    ratio = f"{j['median_s'] / t['median_s']:.2f}" if (t and j) else "n/a"
    what = {
      "train": f"train step (batch {args.batch})",
      "infer": "inference (per image)",
      "predict": "model-zoo predict, 800x1333 (per image)",
    }[mode]
    print(
      f"| {what} | {fmt(t, 'median_s', '%.3f')} | {fmt(j, 'median_s', '%.3f')} | {ratio} | "
      f"{fmt(t, 'peak_rss_mb', '%.0f')} | {fmt(j, 'peak_rss_mb', '%.0f')} | "
      f"{fmt(j, 'compile_and_first_s', '%.0f')} |"
    )
    if args.device != "cpu":
      print(
        f"|   peak device memory (MB): torch max_memory_allocated, JAX allocator peak | "
        f"{fmt(t, 'peak_device_mb', '%.0f')} | {fmt(j, 'peak_device_mb', '%.0f')} | | | | |"
      )
      print(f"|   JAX compiled program's memory (MB) | | {fmt(j, 'program_mb', '%.0f')} | | | | |")
  for mode in args.modes.split(","):
    rs = [
      j / t
      for t, j in zip(round_medians.get(("torch", mode), []), round_medians.get(("jax", mode), []))
    ]
    if len(rs) > 1:
      print(
        f"{mode}: ratio of each round {[round(x, 2) for x in rs]}, median "
        f"{statistics.median(rs):.2f}"
      )
  if ("torch", "train") in results:
    print(f"torchvision parameters: {results[('torch', 'train')]['params']:,}")
  if ("jax", "predict") in results:
    print(f"Predictor compilations: {results[('jax', 'predict')]['compilations']}")
  shutil.rmtree(weights_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
