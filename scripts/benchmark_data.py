"""Training-pipeline throughput in images per second per CPU core.

Two data sets, both built here into a temporary tfds data dir:
  coco_like: 640 x 480 JPEGs with ~7 polygon instances each (Poisson mean 7), built with
             coco_instances; resized to 800 / 1333, padded to 1344 x 1344, 100 instances,
             112 x 112 masks (the paper's recipe at TPU-friendly static shapes).
  shapes:    shapes_instances/demo at 128 x 128.
Each measurement runs in a subprocess pinned to ONE core (os.sched_setaffinity) with one tf.data
thread, so the figure is images/s per core. Goal: >= 30 images/s per core with masks.

  python scripts/benchmark_data.py [--images 96] [--batches 12] [--batch 8]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from rethink_jax import runtime


def write_coco_like(root: str, num_images: int, seed: int = 0) -> tuple[str, str, float]:
  """num_images 640x480 JPEGs + a COCO JSON with ~7 polygon instances per image."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  img_dir = os.path.join(root, "images")
  os.makedirs(img_dir, exist_ok=True)
  images, anns = [], []
  for i in range(1, num_images + 1):
    w, h = (640, 480) if i % 4 else (480, 640)  # a few portrait images, as in COCO
    base = rng.integers(0, 255, (h // 8, w // 8, 3), np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    for _ in range(max(1, rng.poisson(7))):
      cx, cy = rng.uniform(0, w), rng.uniform(0, h)
      r = rng.uniform(10, 150)
      k = rng.integers(3, 12)
      ang = np.sort(rng.uniform(0, 2 * np.pi, k))
      rad = r * rng.uniform(0.5, 1.0, k)
      pts = np.stack(
        [np.clip(cx + rad * np.cos(ang), 0, w), np.clip(cy + rad * np.sin(ang), 0, h)], 1
      )
      draw.polygon([tuple(p) for p in pts], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
      x0, y0 = pts.min(0)
      x1, y1 = pts.max(0)
      if x1 - x0 < 1 or y1 - y0 < 1:
        continue
      anns.append(
        {
          "id": len(anns) + 1,
          "image_id": i,
          "category_id": int(rng.integers(1, 81)),
          "iscrowd": 0,
          "area": float((x1 - x0) * (y1 - y0) / 2),
          "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
          "segmentation": [pts.ravel().tolist()],
        }
      )
    name = f"{i:012d}.jpg"
    im.save(os.path.join(img_dir, name), quality=90)
    images.append({"id": i, "file_name": name, "height": h, "width": w})
  cats = [{"id": k, "name": f"c{k}"} for k in range(1, 81)]
  ann_file = os.path.join(root, "instances.json")
  with open(ann_file, "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": cats}, f)
  return ann_file, img_dir, len(anns) / num_images


def measure(spec: dict) -> tuple[float, float]:
  """Runs in the pinned subprocess: builds the iterator, times `batches` batches after warmup."""
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  c = pipeline.default_data_config()
  c.update(spec["data"])
  it = stream.make_train_iterator(c, spec["batch"], seed=0, process_index=0, process_count=1)
  for _ in range(2):
    next(it)
  t, cpu = time.perf_counter(), time.process_time()
  for _ in range(spec["batches"]):
    batch = next(it)
  dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
  assert batch["gt_masks"].shape[1:] == (c.max_instances, c.mask_size, c.mask_size)
  n = spec["batches"] * spec["batch"]
  return n / dt, n / dcpu


def run_pinned(spec: dict) -> tuple[float, float]:
  """Runs measure(spec) in a fresh process pinned to one core (before TF starts its threads)."""
  env = dict(
    os.environ,
    CUDA_VISIBLE_DEVICES="",
    TF_CPP_MIN_LOG_LEVEL="2",
    JAX_PLATFORMS="cpu",
    TF_NUM_INTEROP_THREADS="1",
    TF_NUM_INTRAOP_THREADS="1",
  )
  out = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "--measure", json.dumps(spec)],
    env=env,
    check=False,
    capture_output=True,
    text=True,
  )
  if out.returncode:
    raise RuntimeError(f"measurement failed:\n{out.stderr[-3000:]}")
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
  return tuple(float(v) for v in line.split()[1:3])


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=96)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    runtime.configure()  # after the pinning: TensorFlow starts its threads here
    print("RESULT", *measure(json.loads(args.measure)))
    return
  runtime.configure()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax.data import coco  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory() as tmp:
    ann, img_dir, per_image = write_coco_like(os.path.join(tmp, "src"), args.images)
    data_dir = os.path.join(tmp, "tfds")
    t = time.perf_counter()
    coco.build_coco_instances(data_dir, {"train": (ann, img_dir)}, name="bench")
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    shapes.ShapesInstances(config="demo", data_dir=data_dir).download_and_prepare()
    shapes_s = time.perf_counter() - t
    common = {"data_dir": data_dir, "num_parallel_calls": 1, "prefetch": 1, "flip_prob": 0.5}
    coco_spec = {
      "batch": args.batch,
      "batches": args.batches,
      "data": dict(
        common,
        name="coco_instances",
        builder_config="bench",
        min_size=800,
        max_size=1333,
        pad_to=[1344, 1344],
        max_instances=100,
        mask_size=112,
      ),
    }
    shapes_spec = {
      "batch": args.batch,
      "batches": args.batches * 8,
      "data": dict(
        common,
        name="shapes_instances",
        builder_config="demo",
        min_size=128,
        max_size=128,
        pad_to=[128, 128],
        max_instances=100,
        mask_size=112,
      ),
    }
    coco_ips = run_pinned(coco_spec)
    shapes_ips = run_pinned(shapes_spec)
  print(
    "images/s per core: wall = images / wall-clock s on one pinned core (lower bound on a "
    "shared machine); cpu = images / CPU s of that process (what one free core would do)"
  )
  print(
    f"coco_like 640x480 JPEG, {per_image:.1f} instances/image -> 800/1333 padded 1344x1344, "
    f"masks 100x112x112: wall {coco_ips[0]:.1f}, cpu {coco_ips[1]:.1f} images/s per core "
    "(goal >= 30)"
  )
  print(
    f"shapes_instances/demo 128x128, masks 100x112x112: wall {shapes_ips[0]:.1f}, "
    f"cpu {shapes_ips[1]:.1f} images/s per core"
  )
  print(
    f"build: coco_like {args.images} images {build_s:.1f} s, shapes demo {shapes_s:.1f} s; "
    f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
  )


if __name__ == "__main__":
  main()
