r"""Ahead-of-time compilation of the real train step for TPU slices, without TPU hardware.

libtpu (requirements-tpu.txt) compiles for a described topology (jax.experimental.topologies);
nothing runs. For each (topology, padded image size, images per chip, dtype) the script gets the
recipe's train step from rethink_jax.train.build_parts, the trainer's own construction (its
jitted step with its shardings: batch on the "data" axis, state replicated and donated) on a mesh
of the topology's devices, lowers it on abstract arguments and compiles it, then prints per chip:
  * memory from compiled.memory_analysis(): arguments (state + batch), temporaries, and the total
    the chip must hold (arguments + outputs - donated aliases + temporaries + code) vs its HBM;
  * FLOPs per step from compiled.cost_analysis() (per chip: the SPMD-partitioned program);
  * the time that many FLOPs take at the chip's peak bf16 rate, hence an upper bound on images/s
    per chip (real steps are slower: memory-bound ops, gathers, NMS, the input pipeline).

  .venv/bin/pip install -r requirements-tpu.txt
  PYTHONPATH=. nice .venv/bin/python scripts/tpu_compile.py --topologies v5e:2x2 \
      --images-per-chip 2 --dtypes bfloat16 --image-sizes 1024x1024
  (add --roi-heads cascade for Cascade Mask R-CNN)
  PYTHONPATH=. .venv/bin/python scripts/tpu_compile.py  # all: 3 topologies x 4 sizes x 3 x 2, slow

Each compile of R50-FPN-GN Mask R-CNN takes minutes on a small CPU; pick a subset with the flags.
--json FILE appends one JSON line per compiled case (to keep a table across runs).
The keypoint model (gt_keypoints in the abstract batch), 2 bf16 images per v5e chip:
  PYTHONPATH=. nice .venv/bin/python scripts/tpu_compile.py \
      --config configs/scratch_keypoint_rcnn_R_50_FPN_gn.py --topologies v5e:2x2 \
      --images-per-chip 2 --dtypes bfloat16 --image-sizes 1024x1024
--keypoint turns any other recipe's model into a Keypoint R-CNN (model.keypoint_on, no mask head,
data.keypoints).
"""

import os

# Compile-only use of libtpu: no TPU is attached; other processes on the machine may hold libtpu's
# lock file; never query the GCE metadata server.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib.util  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GIB = 2.0**30
# Per chip: HBM (GiB), peak dense bf16 TFLOP/s, and the topology's options (v4: one device per
# chip, both TensorCores as one "megacore" device, as JAX uses it; v5p is megacore by default).
CHIPS = {
  "v5e": dict(hbm_gib=16.0, peak_tflops=197.0, options={}),
  "v4": dict(hbm_gib=32.0, peak_tflops=275.0, options=dict(chip_config_name="megacore")),
  "v5p": dict(hbm_gib=95.0, peak_tflops=459.0, options={}),
}
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "scratch_mask_rcnn_R_50_FPN_gn.py")


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def chip_of(topology: str) -> dict:
  kind = topology.split(":")[0]
  if kind not in CHIPS:
    raise ValueError(f"unknown TPU generation {kind!r} in {topology!r}; known: {sorted(CHIPS)}")
  return CHIPS[kind]


def topology_devices(topology: str) -> list:
  """The compile-only devices of a topology such as "v5e:2x2" (one per chip)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  return list(topologies.get_topology_desc(topology, "tpu", **chip_of(topology)["options"]).devices)


def load_config(path: str, arg: str = ""):
  """get_config(arg) of a configs/*.py file."""
  spec = importlib.util.spec_from_file_location("tpu_compile_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def abstract_batch(config, batch_size: int, image_hw, sharding=None) -> dict:
  """ShapeDtypeStructs of a global training batch (the pipeline's batch dict, CONTRACTS.md);
  gt_keypoints (K = model.keypoint_head.num_keypoints) for a keypoint model."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  h, w = image_hw
  g, s = int(config.data.max_instances), int(config.data.mask_size)
  k = 0
  # data.recipe.resolve_config turns data.keypoints on for a keypoint model.
  if config.data.get("keypoints") or config.model.get("keypoint_on"):
    k = int(config.model.keypoint_head.num_keypoints)
    if k <= 0:
      raise ValueError("model.keypoint_head.num_keypoints must be the data set's K (> 0) here")
  shapes = dict(
    image=((h, w, 3), np.float32),
    image_hw=((2,), np.int32),
    image_id=((), np.int32),
    orig_hw=((2,), np.int32),
    scale=((), np.float32),
    valid=((), np.bool_),
    gt_boxes=((g, 4), np.float32),
    gt_classes=((g,), np.int32),
    gt_masks=((g, s, s), np.uint8),
  )
  if k:
    shapes["gt_keypoints"] = ((g, k, 3), np.float32)  # [x, y, v] in input pixels
  return {
    k: jax.ShapeDtypeStruct((batch_size,) + shape, dtype, sharding=sharding)
    for k, (shape, dtype) in shapes.items()
  }


def lower_train_step(config, devices, images_per_chip: int, image_hw):
  """The trainer's step (rethink_jax.train.build_parts on a "data" mesh over `devices`) lowered on
  abstract arguments with the trainer's shardings. Returns (lowered, parts)."""
  import jax  # pylint: disable=g-import-not-at-top

  from rethink_jax import optim  # pylint: disable=g-import-not-at-top
  from rethink_jax import train  # pylint: disable=g-import-not-at-top
  from rethink_jax import trainer  # pylint: disable=g-import-not-at-top

  mesh = trainer.make_mesh(devices)
  batch_size = images_per_chip * len(devices)
  sample = {
    k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype)
    for k, v in abstract_batch(config, 1, image_hw).items()
  }
  sched = optim.resolve_schedule(config.schedule, config.optim, batch_size)
  parts = train.build_parts(config, sched, mesh, sample)
  lowered = parts.train_step.lower(
    trainer.abstract_state_with_shardings(parts),
    abstract_batch(config, batch_size, image_hw, parts.batch_sharding),
  )
  return lowered, parts


def compile_train_step(config, devices, images_per_chip: int, image_hw):
  """Lowers and compiles the trainer's step for `devices` (lower_train_step).

  Returns (compiled, seconds to lower, seconds to compile).
  """
  t0 = time.time()
  lowered, _ = lower_train_step(config, devices, images_per_chip, image_hw)
  t1 = time.time()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.time() - t1


def analyse(compiled, chip: dict, images_per_chip: int) -> dict:
  """Per-chip memory (GiB), FLOPs and the peak-rate bounds of a compiled step."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0]
  args = mem.argument_size_in_bytes
  temp = mem.temp_size_in_bytes
  total = (
    args
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + temp
    + mem.generated_code_size_in_bytes
  )
  flops = float(cost.get("flops", 0.0))
  t_min = flops / (chip["peak_tflops"] * 1e12)
  return dict(
    args_gib=args / GIB,
    temp_gib=temp / GIB,
    total_gib=total / GIB,
    hbm_gib=chip["hbm_gib"],
    fits=total / GIB <= chip["hbm_gib"],
    gflops=flops / 1e9,
    t_min_ms=t_min * 1e3,
    max_img_s=images_per_chip / t_min if t_min > 0 else float("inf"),
  )


def as_keypoint_model(config) -> None:
  """The recipe's model as a Keypoint R-CNN: the keypoint head instead of the mask head, and
  gt_keypoints in the batch."""
  config.model.keypoint_on = True
  config.model.mask_on = False
  config.data.keypoints = True


def _parse_hw(text: str):
  h, w = (int(v) for v in text.lower().split("x"))
  return h, w


HEADER = (
  "| topology | image | img/chip | dtype | args GiB | temp GiB | total GiB | HBM GiB | "
  "fits | GFLOP/step/chip | t_min ms | img/s/chip max | compile s |"
)


def row(r: dict) -> str:
  return (
    f"| {r['topology']} | {r['image']} | {r['images_per_chip']} | {r['dtype']} | "
    f"{r['args_gib']:.2f} | {r['temp_gib']:.2f} | {r['total_gib']:.2f} | {r['hbm_gib']:.0f} "
    f"| {'yes' if r['fits'] else 'NO'} | {r['gflops']:.0f} | {r['t_min_ms']:.1f} | "
    f"{r['max_img_s']:.1f} | {r['compile_s']:.0f} |"
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default=DEFAULT_CONFIG, help="a configs/*.py recipe")
  p.add_argument("--config-arg", default="", help="its ARG (schedule); irrelevant to the step")
  p.add_argument("--topologies", default="v5e:2x2,v4:2x2x1,v5p:2x2x1")
  p.add_argument(
    "--image-sizes",
    default="1024x1024,1344x1344,800x1344,1344x800",
    help="padded HxW; for the 800/1333 setting 800x1344 and 1344x800 are the orientation buckets "
    "(data.pad_buckets), 1344x1344 the square canvas without them",
  )
  p.add_argument("--images-per-chip", default="1,2,4")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--json", default="", help="append one JSON line per case to this file")
  p.add_argument(
    "--mask-chunk-rois",
    type=int,
    default=None,
    help="override model.mask_head.chunk_rois (0: the mask branch in one pass, "
    "which needs less memory than skippable chunks)",
  )
  p.add_argument(
    "--roi-heads",
    choices=("standard", "cascade"),
    default=None,
    help="override model.roi_heads.name (cascade: Cascade R-CNN's three box stages)",
  )
  p.add_argument(
    "--keypoint",
    action="store_true",
    help="the recipe's model as a Keypoint R-CNN (as_keypoint_model)",
  )
  args = p.parse_args(argv)
  from rethink_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure()
  if not libtpu_available():
    sys.exit("libtpu is not installed: pip install -r requirements-tpu.txt")

  config = load_config(args.config, args.config_arg)
  if args.mask_chunk_rois is not None:
    config.model.mask_head.chunk_rois = args.mask_chunk_rois
  if args.roi_heads is not None:
    config.model.roi_heads.name = args.roi_heads
  if args.keypoint:
    as_keypoint_model(config)
  m = config.model
  branches = []
  if m.get("mask_on", True):
    branches.append(f"mask branch in chunks of {m.mask_head.chunk_rois or 'all'} ROIs")
  if m.get("keypoint_on", False):
    kh = m.keypoint_head
    branches.append(
      f"keypoint branch ({kh.num_keypoints} keypoints) in chunks of {kh.chunk_rois or 'all'} ROIs"
    )
  b = m.backbone
  name = f"X{b.depth}-{b.groups}x{b.width_per_group}d" if b.groups > 1 else f"R{b.depth}"
  print(
    f"config {os.path.relpath(args.config, ROOT)}; model: {name}-FPN "
    f"norm {m.backbone.norm}, {m.roi_heads.name} ROI heads, {m.num_classes} classes, "
    + ", ".join(branches),
    flush=True,
  )
  print(HEADER)
  print("|" + "---|" * (HEADER.count("|") - 1))
  rows = []
  for topology in args.topologies.split(","):
    devices = topology_devices(topology)
    chip = chip_of(topology)
    for size in args.image_sizes.split(","):
      hw = _parse_hw(size)
      for ipc in (int(v) for v in args.images_per_chip.split(",")):
        for dtype in args.dtypes.split(","):
          c = config.copy_and_resolve_references()
          c.model.dtype = dtype
          c.data.pad_to = hw
          compiled, lower_s, compile_s = compile_train_step(c, devices, ipc, hw)
          r = dict(
            topology=topology,
            chips=len(devices),
            image=f"{hw[0]}x{hw[1]}",
            images_per_chip=ipc,
            dtype=dtype,
            lower_s=lower_s,
            compile_s=compile_s,
            mask_chunk_rois=c.model.mask_head.chunk_rois,
            keypoint=bool(c.model.get("keypoint_on", False)),
            **analyse(compiled, chip, ipc),
          )
          rows.append(r)
          print(row(r), flush=True)
          if args.json:
            with open(args.json, "a") as f:
              f.write(json.dumps(r) + "\n")
          del compiled
  return rows


if __name__ == "__main__":
  main()
