"""Times convolutions (forward + backward) on the CPU: this project against torch.

  python scripts/benchmark_grouped_conv.py --size 224 --batch 1 [--iters 5] [--groups 32]
      [--width-per-group 8]
  python scripts/benchmark_grouped_conv.py --dense --size 512 --batch 2

Default: the grouped 3x3 convs of X-101-32x8d, one row per stage (res2..res5, the first block's
strided conv where the stride sits). --dense: the 3x3 (and 7x7 stem) convs of R50-FPN Mask R-CNN
at size x size: backbone stages, an FPN output conv, and the box and mask heads' convs on
512 ROIs per image at 7 x 7 and 64 per image at 14 x 14.

Each row: the median time of y = conv(x, w); d(sum(y * g))/d(x, w) under jax.jit through the
models' conv (rethink_jax.ops.xla_cpu.conv2d: on one CPU device oneDNN's primitives as custom
calls, rethink_jax/ops/onednn.py), through the XLA forms it falls back to without oneDNN
(xla_cpu.conv2d_cpu_xla) and through torch.nn.functional.conv2d with autograd, and the ratio
ours / torch.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from rethink_jax import runtime
from rethink_jax.ops import onednn
from rethink_jax.ops import xla_cpu


def grouped_shapes(size: int, batch: int, groups: int, width_per_group: int) -> list[tuple]:
  """(name, batch, input H, in channels, out channels, kernel, stride, groups) of each stage's
  grouped 3x3 conv for a size x size image."""
  rows = []
  for k, name in enumerate(("res2", "res3", "res4", "res5")):
    channels = groups * width_per_group * 2**k
    h_out = size // (4 * 2**k)
    stride = 1 if k == 0 else 2
    rows.append((name + ".0", batch, h_out * stride, channels, channels, 3, stride, groups))
    rows.append((name + ".1", batch, h_out, channels, channels, 3, 1, groups))
  return rows


def dense_shapes(size: int, batch: int) -> list[tuple]:
  """The same fields for the dense convs of R50-FPN Mask R-CNN at size x size."""
  return [
    ("stem", batch, size, 3, 64, 7, 2, 1),
    ("res2", batch, size // 4, 64, 64, 3, 1, 1),
    ("res3.0", batch, size // 4, 128, 128, 3, 2, 1),
    ("res3", batch, size // 8, 128, 128, 3, 1, 1),
    ("res4", batch, size // 16, 256, 256, 3, 1, 1),
    ("res5", batch, size // 32, 512, 512, 3, 1, 1),
    ("fpn.p2", batch, size // 4, 256, 256, 3, 1, 1),
    ("box_head", 512 * batch, 7, 256, 256, 3, 1, 1),
    ("mask_head", 64 * batch, 14, 256, 256, 3, 1, 1),
  ]


def median_time(fn, iters: int) -> float:
  fn()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def public_conv(x, w, stride, groups):
  k = w.shape[0]
  return xla_cpu.conv2d(x, w, strides=(stride, stride), padding=(k // 2, k // 2), groups=groups)


def xla_forms(x, w, stride, groups):
  k = w.shape[0]
  spec = xla_cpu.ConvSpec((stride, stride), (k // 2, k // 2), (1, 1), groups)
  return xla_cpu.conv2d_cpu_xla(x, w, spec)


def bench_jax(conv, x, w, g, stride: int, groups: int, iters: int) -> float:
  def loss(x, w):
    return jnp.sum(conv(x, w, stride, groups) * g)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  x, w = jnp.asarray(x), jnp.asarray(w)
  return median_time(lambda: jax.block_until_ready(step(x, w)), iters)


def bench_torch(x: np.ndarray, w: np.ndarray, g: np.ndarray, stride: int, groups: int, iters: int):
  import torch  # pylint: disable=g-import-not-at-top

  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_()
  wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).requires_grad_()
  gt = torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2)))
  padding = w.shape[0] // 2

  def step():
    xt.grad = wt.grad = None
    y = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=padding, groups=groups)
    (y * gt).sum().backward()

  return median_time(step, iters)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--groups", type=int, default=32)
  parser.add_argument("--width-per-group", type=int, default=8)
  parser.add_argument("--dense", action="store_true", help="R50-FPN Mask R-CNN's dense convs")
  args = parser.parse_args()
  runtime.configure(hide_gpus_from_tf=False)  # TensorFlow plays no part here
  jax.config.update("jax_platforms", "cpu")  # the comparison is XLA:CPU against torch's CPU
  print(f"oneDNN custom calls: {'on' if onednn.available() else 'off'}")
  if args.dense:
    rows = dense_shapes(args.size, args.batch)
  else:
    rows = grouped_shapes(args.size, args.batch, args.groups, args.width_per_group)
  rng = np.random.default_rng(0)
  total_ours = total_xla = total_torch = 0.0
  for name, n, h, cin, cout, k, stride, groups in rows:
    x = rng.normal(size=(n, h, h, cin)).astype(np.float32)
    w = rng.normal(size=(k, k, cin // groups, cout)).astype(np.float32) * 0.05
    h_out = (h + 2 * (k // 2) - k) // stride + 1
    g = rng.normal(size=(n, h_out, h_out, cout)).astype(np.float32)
    ours = bench_jax(public_conv, x, w, g, stride, groups, args.iters)
    xla = bench_jax(xla_forms, x, w, g, stride, groups, args.iters)
    theirs = bench_torch(x, w, g, stride, groups, args.iters)
    total_ours, total_xla, total_torch = total_ours + ours, total_xla + xla, total_torch + theirs
    print(
      f"{name} {n}x{h}x{h}x{cin} {k}x{k}/{stride} groups {groups}: ours {ours * 1e3:.2f} ms "
      f"(XLA forms {xla * 1e3:.2f} ms), torch {theirs * 1e3:.2f} ms, ratio {ours / theirs:.2f}"
    )
  kind = "dense convs" if args.dense else "grouped 3x3 convs"
  print(
    f"{kind} fwd+bwd, batch {args.batch}, {args.size}x{args.size}, "
    f"{jax.devices()[0].platform}: ours {total_ours * 1e3:.1f} ms (XLA forms "
    f"{total_xla * 1e3:.1f} ms), torch {total_torch * 1e3:.1f} ms, ratio "
    f"{total_ours / total_torch:.2f}"
  )


if __name__ == "__main__":
  main()
