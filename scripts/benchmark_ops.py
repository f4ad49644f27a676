"""Speed of this project's RoIAlign and NMS against torchvision's, same machine, same run.

  .venv/bin/python scripts/benchmark_ops.py [--threads 2] [--repeats 5] [--adaptive] [--device cuda]

Sizes (Mask R-CNN, 1024 x 1024 input): RoIAlign on P2..P5 (256 channels) of 2 images with
512 ROIs each at 7 x 7 and 128 ROIs each at 14 x 14, sampling_ratio 2, aligned; forward and
forward+backward (gradient w.r.t. the features). The torch peer is Detectron2's ROIPooler
(assign levels, torchvision.ops.roi_align per level on its boxes, scatter back). NMS: 4,000
scored boxes to 1,000 at IoU 0.7, 2 images (torch: a Python loop over the 2 images).
Prints the median time of each and ratio = ours / torchvision.
"""

import argparse
import math
import time

import numpy as np

from rethink_jax import runtime


def _median_time(fn, repeats):
  fn()  # warm up / compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _boxes(rng, n, image=1024.0):
  # Log-uniform sizes from 16 to 600 px, so that every FPN level gets boxes.
  size = np.exp(rng.uniform(math.log(16), math.log(600), (n, 1)))
  aspect = np.exp(rng.uniform(-0.7, 0.7, (n, 1)))
  wh = np.concatenate([size * aspect, size / aspect], 1)
  ctr = rng.uniform(0, image, (n, 2))
  return np.clip(np.concatenate([ctr - wh / 2, ctr + wh / 2], 1), 0, image).astype(np.float32)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--device",
    default="cpu",
    choices=["cpu", "cuda"],
    help="torch device; JAX uses its default backend (run on a GPU machine "
    "with jax[cuda] for cuda)",
  )
  parser.add_argument(
    "--adaptive",
    action="store_true",
    help="also time sampling_ratio=0 (the default config; cap 4 here)",
  )
  args = parser.parse_args()
  runtime.configure(hide_gpus_from_tf=False)  # TensorFlow plays no part here

  import jax
  import jax.numpy as jnp
  import torch
  import torchvision

  from rethink_jax.ops.nms import nms
  from rethink_jax.ops.roi_align import multilevel_roi_align

  torch.set_num_threads(args.threads)
  dev = torch.device(args.device)
  sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
  rng = np.random.default_rng(0)
  batch, channels = 2, 256
  feats = {
    f"p{k}": rng.normal(size=(batch, 1024 >> k, 1024 >> k, channels)).astype(np.float32)
    for k in range(2, 6)
  }
  jfeats = {k: jnp.asarray(v) for k, v in feats.items()}
  tfeats = {
    k: torch.from_numpy(v).permute(0, 3, 1, 2).contiguous().to(dev) for k, v in feats.items()
  }
  rows = []

  def torch_pooler(tf, boxes, out, sr):
    # Detectron2's ROIPooler: level per box, roi_align per level on its boxes, scatter back.
    t = torch.from_numpy(boxes.reshape(-1, 4)).to(dev)
    size = torch.sqrt((t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1]))
    level = torch.clamp(torch.floor(4 + torch.log2(size / 224 + 1e-8)), 2, 5).long()
    res = torch.zeros(t.shape[0], channels, out, out, device=dev)
    ids = (
      torch.arange(boxes.shape[0], device=dev).repeat_interleave(boxes.shape[1]).float()[:, None]
    )
    rois = torch.cat([ids, t], 1)
    for k in range(2, 6):
      inds = torch.nonzero(level == k).squeeze(1)
      res[inds] = torchvision.ops.roi_align(tf[f"p{k}"], rois[inds], (out, out), 2.0**-k, sr, True)
    return res

  cases = [(512, 7, 2), (128, 14, 2)] + ([(512, 7, 0), (128, 14, 0)] if args.adaptive else [])
  for num_rois, out, sr in cases:
    boxes = np.stack([_boxes(rng, num_rois) for _ in range(batch)])
    jboxes = jnp.asarray(boxes)
    fwd = jax.jit(lambda f, b: multilevel_roi_align(f, b, out, sr, True))
    grad = jax.jit(jax.grad(lambda f, b: jnp.sum(multilevel_roi_align(f, b, out, sr, True) ** 2)))
    ours_f = _median_time(lambda: fwd(jfeats, jboxes).block_until_ready(), args.repeats)
    ours_b = _median_time(lambda: jax.block_until_ready(grad(jfeats, jboxes)), args.repeats)

    def torch_fwd():
      with torch.no_grad():
        torch_pooler(tfeats, boxes, out, sr)
      sync()

    tgrad = {k: v.clone().requires_grad_(True) for k, v in tfeats.items()}

    def torch_bwd():
      for v in tgrad.values():
        v.grad = None
      (torch_pooler(tgrad, boxes, out, sr) ** 2).sum().backward()
      sync()

    tv_f = _median_time(torch_fwd, args.repeats)
    tv_b = _median_time(torch_bwd, args.repeats)
    name = f"RoIAlign P2-P5 {batch}x{num_rois} {out}x{out} C{channels} sr{sr}"
    if sr:
      rows.append((name + " fwd", ours_f, tv_f))
    rows.append((name + " fwd+bwd", ours_b, tv_b))

  n, max_out = 4000, 1000
  nboxes = np.stack([_boxes(rng, n) for _ in range(batch)])
  nscores = rng.random((batch, n)).astype(np.float32)
  jn = jax.jit(jax.vmap(lambda b, s: nms(b, s, 0.7, max_out)))
  jnb, jns = jnp.asarray(nboxes), jnp.asarray(nscores)
  ours_n = _median_time(lambda: jax.block_until_ready(jn(jnb, jns)), args.repeats)
  tnb, tns = torch.from_numpy(nboxes).to(dev), torch.from_numpy(nscores).to(dev)

  def torch_nms():
    for i in range(batch):
      torchvision.ops.nms(tnb[i], tns[i], 0.7)[:max_out]
    sync()

  rows.append(
    (f"NMS {batch}x{n} -> {max_out} IoU 0.7", ours_n, _median_time(torch_nms, args.repeats))
  )

  print(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on "
    f"{args.device} ({torch.get_num_threads()} CPU threads); median of {args.repeats}"
  )
  print(f"{'op':58s} {'ours ms':>9s} {'torchvision ms':>15s} {'ratio':>6s}")
  for name, ours, ref in rows:
    print(f"{name:58s} {ours * 1e3:9.1f} {ref * 1e3:15.1f} {ours / ref:6.2f}")


if __name__ == "__main__":
  main()
