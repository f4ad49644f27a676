"""Speed of this project's RoIAlign and NMS against torchvision's, same machine, same run.

  .venv/bin/python scripts/benchmark_ops.py [--threads 2] [--repeats 5]

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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import torch
  import torchvision
  from rethink_jax.ops.nms import nms
  from rethink_jax.ops.roi_align import assign_levels, multilevel_roi_align

  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  batch, channels = 2, 256
  feats = {f"p{k}": rng.normal(size=(batch, 1024 >> k, 1024 >> k, channels)).astype(np.float32)
           for k in range(2, 6)}
  jfeats = {k: jnp.asarray(v) for k, v in feats.items()}
  tfeats = {k: torch.from_numpy(v).permute(0, 3, 1, 2).contiguous() for k, v in feats.items()}
  rows = []

  def torch_pooler(tf, boxes, out):
    level = np.asarray(assign_levels(boxes, 2, 5))
    n = boxes.shape[0] * boxes.shape[1]
    res = torch.zeros(n, channels, out, out)
    level = level.reshape(-1)
    flat = torch.from_numpy(boxes.reshape(-1, 4))
    ids = torch.arange(boxes.shape[0]).repeat_interleave(boxes.shape[1]).float()[:, None]
    rois = torch.cat([ids, flat], 1)
    for k in range(2, 6):
      inds = torch.from_numpy(np.nonzero(level == k)[0])
      res[inds] = torchvision.ops.roi_align(tf[f"p{k}"], rois[inds], (out, out), 2.0 ** -k, 2, True)
    return res

  for num_rois, out in ((512, 7), (128, 14)):
    boxes = np.stack([_boxes(rng, num_rois) for _ in range(batch)])
    jboxes = jnp.asarray(boxes)
    fwd = jax.jit(lambda f, b: multilevel_roi_align(f, b, out, 2, True))
    grad = jax.jit(jax.grad(lambda f, b: jnp.sum(multilevel_roi_align(f, b, out, 2, True) ** 2)))
    ours_f = _median_time(lambda: fwd(jfeats, jboxes).block_until_ready(), args.repeats)
    ours_b = _median_time(lambda: jax.block_until_ready(grad(jfeats, jboxes)), args.repeats)

    def torch_fwd():
      with torch.no_grad():
        torch_pooler(tfeats, boxes, out)

    tgrad = {k: v.clone().requires_grad_(True) for k, v in tfeats.items()}

    def torch_bwd():
      for v in tgrad.values():
        v.grad = None
      (torch_pooler(tgrad, boxes, out) ** 2).sum().backward()

    tv_f = _median_time(torch_fwd, args.repeats)
    tv_b = _median_time(torch_bwd, args.repeats)
    name = f"RoIAlign P2-P5 {batch}x{num_rois} {out}x{out} C{channels} sr2"
    rows.append((name + " fwd", ours_f, tv_f))
    rows.append((name + " fwd+bwd", ours_b, tv_b))

  n, max_out = 4000, 1000
  nboxes = np.stack([_boxes(rng, n) for _ in range(batch)])
  nscores = rng.random((batch, n)).astype(np.float32)
  jn = jax.jit(jax.vmap(lambda b, s: nms(b, s, 0.7, max_out)))
  jnb, jns = jnp.asarray(nboxes), jnp.asarray(nscores)
  ours_n = _median_time(lambda: jax.block_until_ready(jn(jnb, jns)), args.repeats)
  tnb, tns = torch.from_numpy(nboxes), torch.from_numpy(nscores)

  def torch_nms():
    for i in range(batch):
      torchvision.ops.nms(tnb[i], tns[i], 0.7)[:max_out]

  rows.append((f"NMS {batch}x{n} -> {max_out} IoU 0.7", ours_n, _median_time(torch_nms, args.repeats)))

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; median of {args.repeats}")
  print(f"{'op':58s} {'ours ms':>9s} {'torchvision ms':>15s} {'ratio':>6s}")
  for name, ours, ref in rows:
    print(f"{name:58s} {ours * 1e3:9.1f} {ref * 1e3:15.1f} {ours / ref:6.2f}")


if __name__ == "__main__":
  main()
