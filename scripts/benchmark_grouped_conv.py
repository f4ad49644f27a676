"""Times the grouped 3x3 convs of X-101-32x8d (forward + backward): this project against torch.

  python scripts/benchmark_grouped_conv.py --size 224 --batch 1 [--iters 5] [--groups 32]
      [--width-per-group 8]

One row per stage (res2..res5, the first block's strided conv where the stride sits): the
median time of y = conv(x, w); d(sum(y * g))/d(x, w) under jax.jit through layers.Conv2d's
conv (rethink_jax.ops.xla_cpu.conv2d, which picks its CPU form: oneDNN's primitives as custom
calls, rethink_jax/ops/onednn.py), through the XLA form it falls back to without oneDNN
(xla_cpu.grouped_conv_xla) and through torch.nn.functional.conv2d with autograd, all on the CPU,
and the ratio ours / torch.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from rethink_jax import runtime
from rethink_jax.ops import onednn
from rethink_jax.ops import xla_cpu


def stage_shapes(size: int, groups: int, width_per_group: int) -> list[tuple]:
  """(name, input H, channels, stride) of each stage's grouped 3x3 conv for a size x size image."""
  rows = []
  for k, name in enumerate(("res2", "res3", "res4", "res5")):
    channels = groups * width_per_group * 2**k
    h_out = size // (4 * 2**k)
    stride = 1 if k == 0 else 2
    rows.append((name + ".0", h_out * stride, channels, stride))
    rows.append((name + ".1", h_out, channels, 1))
  return rows


def median_time(fn, iters: int) -> float:
  fn()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def public_conv(x, w, stride, groups):
  return xla_cpu.conv2d(x, w, strides=(stride, stride), padding=(1, 1), groups=groups)


def xla_form(x, w, stride, groups):
  return xla_cpu.grouped_conv_xla(x, w, xla_cpu.ConvSpec((stride, stride), (1, 1), (1, 1), groups))


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

  def step():
    xt.grad = wt.grad = None
    y = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1, groups=groups)
    (y * gt).sum().backward()

  return median_time(step, iters)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--groups", type=int, default=32)
  parser.add_argument("--width-per-group", type=int, default=8)
  args = parser.parse_args()
  runtime.configure(hide_gpus_from_tf=False)  # TensorFlow plays no part here
  jax.config.update("jax_platforms", "cpu")  # the comparison is XLA:CPU against torch's CPU
  print(f"oneDNN custom calls: {'on' if onednn.available() else 'off'}")
  rng = np.random.default_rng(0)
  total_ours = total_xla = total_torch = 0.0
  for name, h, c, stride in stage_shapes(args.size, args.groups, args.width_per_group):
    x = rng.normal(size=(args.batch, h, h, c)).astype(np.float32)
    w = rng.normal(size=(3, 3, c // args.groups, c)).astype(np.float32) * 0.05
    h_out = (h + 2 - 3) // stride + 1
    g = rng.normal(size=(args.batch, h_out, h_out, c)).astype(np.float32)
    ours = bench_jax(public_conv, x, w, g, stride, args.groups, args.iters)
    xla = bench_jax(xla_form, x, w, g, stride, args.groups, args.iters)
    theirs = bench_torch(x, w, g, stride, args.groups, args.iters)
    total_ours, total_xla, total_torch = total_ours + ours, total_xla + xla, total_torch + theirs
    print(
      f"{name} {h}x{h}x{c} /{stride} groups {args.groups}: ours {ours * 1e3:.2f} ms "
      f"(XLA form {xla * 1e3:.2f} ms), torch {theirs * 1e3:.2f} ms, ratio {ours / theirs:.2f}"
    )
  print(
    f"grouped 3x3 conv fwd+bwd, batch {args.batch}, {args.size}x{args.size}, "
    f"{jax.devices()[0].platform}: ours {total_ours * 1e3:.1f} ms (XLA form "
    f"{total_xla * 1e3:.1f} ms), torch {total_torch * 1e3:.1f} ms, ratio "
    f"{total_ours / total_torch:.2f}"
  )


if __name__ == "__main__":
  main()
