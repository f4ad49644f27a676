"""Times R50-GN + FPN-GN forward+backward (this project vs torchvision, same run, same device).

  python scripts/benchmark_backbone.py --size 512 --batch 2 [--dtype bfloat16]
      [--iters 5] [--norm FrozenBN]

Prints the median step time of each and the ratio (ours / torchvision); on a GPU torch runs on
CUDA too (autocast for bfloat16). The loss is the mean square of P2..P6. --norm FrozenBN swaps
every GroupNorm for a fixed affine (FPN without norm) in both, which isolates the norms' cost.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from rethink_jax import runtime


def bench_jax(size: int, batch: int, dtype: str, iters: int, norm: str) -> tuple[float, float]:
  from rethink_jax.models import build_resnet_fpn  # pylint: disable=g-import-not-at-top

  model = build_resnet_fpn(depth=50, norm=norm, fpn_norm="GN" if norm == "GN" else "", dtype=dtype)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x[:1])
  params = variables.pop("params")  # FrozenBN's affines stay constants

  def loss(p, x):
    out = model.apply({"params": p, **variables}, x, train=True)
    return sum(jnp.mean(jnp.square(o.astype(jnp.float32))) for o in out.values())

  step = jax.jit(jax.value_and_grad(loss))
  t = time.perf_counter()
  jax.block_until_ready(step(params, x))
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - t)
  return float(np.median(times)), compile_s


def bench_torch(size: int, batch: int, dtype: str, iters: int, norm: str) -> tuple[float, str]:
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from torchvision.ops import FeaturePyramidNetwork  # pylint: disable=g-import-not-at-top
  from torchvision.ops.feature_pyramid_network import LastLevelMaxPool  # pylint: disable=g-import-not-at-top

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  gn = lambda c: torch.nn.GroupNorm(32, c)
  norm_layer = gn if norm == "GN" else torchvision.ops.FrozenBatchNorm2d
  body = torchvision.models.resnet50(norm_layer=norm_layer).to(dev)
  fpn = FeaturePyramidNetwork(
    [256, 512, 1024, 2048],
    256,
    extra_blocks=LastLevelMaxPool(),
    norm_layer=gn if norm == "GN" else None,
  ).to(dev)
  x = torch.randn(batch, 3, size, size, device=dev)

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      t = body.maxpool(body.relu(body.bn1(body.conv1(x))))
      feats = {}
      for i in range(1, 5):
        t = getattr(body, f"layer{i}")(t)
        feats[str(i)] = t
      out = fpn(feats)
      loss = sum((o.float() ** 2).mean() for o in out.values())
    loss.backward()
    if dev == "cuda":
      torch.cuda.synchronize()

  step()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return float(np.median(times)), dev


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--norm", default="GN", choices=("GN", "FrozenBN"))
  args = parser.parse_args()
  runtime.configure(hide_gpus_from_tf=False)  # TensorFlow plays no part here
  ours, compile_s = bench_jax(args.size, args.batch, args.dtype, args.iters, args.norm)
  theirs, dev = bench_torch(args.size, args.batch, args.dtype, args.iters, args.norm)
  what = "R50-GN+FPN-GN" if args.norm == "GN" else "R50-FrozenBN+FPN"
  print(
    f"{what} fwd+bwd batch {args.batch} {args.size}x{args.size} {args.dtype} on "
    f"{jax.devices()[0].platform} / torch {dev}: ours {ours * 1e3:.1f} ms (compile "
    f"{compile_s:.1f} s), torchvision {theirs * 1e3:.1f} ms, ratio {ours / theirs:.2f}"
  )


if __name__ == "__main__":
  main()
