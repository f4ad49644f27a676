"""Where the time of the R50-FPN-GN Mask R-CNN train step goes: seconds per module, forward and
backward, from a JAX profiler trace of one step of the trainer (benchmark_model.py's setting:
rethink_jax.train.build_parts's jitted step on its state, the synthetic batch, one device).

  .venv/bin/python scripts/profile_model.py [--size 512 --batch 2 --depth 4]

Each XLA op of the compiled step carries the JAX name stack of the Flax module that emitted it
(e.g. "jvp(MaskRCNN)/roi_heads/roi_heads._mask_branch/mask_head"; "transpose(...)" marks the
backward). The script compiles the step, runs it twice, traces a third run, sums the durations of
the trace's events per op, and groups them by the first `--depth` module names of the op's name
stack, forward and backward apart. On CPU the events are XLA:CPU thunks, so the per-module sums
add up to most of the step (the rest: scheduling gaps and ops without a name stack).
"""

import argparse
import collections
import glob
import os
import re
import tempfile
import time

# HLO instruction name -> the op_name metadata (the JAX name stack) of the compiled module.
_OP_NAME = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = .*metadata=\{[^}]*op_name="([^"]+)"')
_WRAPPERS = re.compile(r"(jvp|transpose|vmap|checkpoint|remat|jit)\(")


def op_names(hlo_text: str) -> dict:
  """{HLO instruction name: JAX name stack} of every instruction that has one."""
  out = {}
  for line in hlo_text.splitlines():
    m = _OP_NAME.match(line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def scope_of(name_stack: str, depth: int) -> str:
  """'fwd ' or 'bwd ' + the first `depth` module names, e.g. 'bwd MaskRCNN/roi_heads'."""
  direction = "bwd" if "transpose(" in name_stack else "fwd"
  parts = [p for p in _WRAPPERS.sub("", name_stack).replace(")", "").split("/") if p]
  return f"{direction} " + "/".join(parts[1 : 1 + depth] or ["(step)"])


def seconds_per_op(trace_dir: str, known: dict) -> collections.Counter:
  """Sum of event durations (s) per HLO instruction name in the trace's xplane."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top

  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise FileNotFoundError(f"the profiler wrote no *.xplane.pb under {trace_dir}")
  space = xplane_pb2.XSpace()
  with open(files[0], "rb") as f:
    space.ParseFromString(f.read())
  out = collections.Counter()
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      for event in line.events:
        name = names.get(event.metadata_id)
        if name in known:
          out[name] += event.duration_ps * 1e-12
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--depth", type=int, default=4, help="module names kept per group")
  p.add_argument("--top", type=int, default=25, help="groups printed")
  args = p.parse_args()
  from rethink_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure()

  # The sibling script (this script's directory is sys.path[0] when it runs).
  import benchmark_model  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from rethink_jax import train  # pylint: disable=g-import-not-at-top

  parts, host, data = benchmark_model.jax_parts(args.size, args.batch)
  state = parts.init(jax.random.PRNGKey(0), train.init_batch(host))
  t = time.perf_counter()
  compiled = parts.train_step.lower(state, data).compile()
  print(f"compiled in {time.perf_counter() - t:.0f} s", flush=True)
  known = op_names(compiled.as_text())
  for _ in range(2):
    state, metrics = compiled(state, data)  # donates the state: keep only the new one
    jax.block_until_ready(metrics)
  t = time.perf_counter()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      state, metrics = compiled(state, data)
      jax.block_until_ready(metrics)
    step_s = time.perf_counter() - t
    per_op = seconds_per_op(trace_dir, known)

  per_scope = collections.Counter()
  for name, s in per_op.items():
    per_scope[scope_of(known[name], args.depth)] += s
  total = sum(per_op.values())
  print(
    f"\nR50-FPN-GN Mask R-CNN train step, {args.size}x{args.size}, batch {args.batch}, CPU "
    f"({os.cpu_count()} cores): {step_s:.1f} s traced step, {total:.1f} s in named ops"
  )
  print("| seconds | share | module (fwd / bwd) |")
  print("| --- | --- | --- |")
  for scope, s in per_scope.most_common(args.top):
    print(f"| {s:.2f} | {100 * s / total:.0f}% | {scope} |")


if __name__ == "__main__":
  main()
