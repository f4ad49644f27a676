"""A changed slice: a checkpoint written on 8 devices resumes on 4 and on 2 (the same global
batch), through the trainer's own restore (rethink_jax.checkpoints.restore_latest with the new
mesh's shardings), and the continued steps equal the 8-device run's within the tolerances of
tests/test_train.py's 8-device == 1-device test. (A checkpoint of 2 processes continued in 1 is
tests/test_multihost.py's test_checkpoint_of_two_processes_resumes_in_one.) One subprocess with 8
CPU devices.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent(r"""
  import json, os, sys
  sys.path.insert(0, sys.argv[1])
  import jax
  import numpy as np
  from configs import tiny_shapes
  from rethink_jax import checkpoints, optim, train, trainer
  assert jax.device_count() == 8, jax.devices()

  def make_batch(rng, b=8, size=64, g=16, s=28):
    batch = dict(
        image=rng.normal(size=(b, size, size, 3)).astype(np.float32),
        image_hw=np.full((b, 2), size, np.int32), orig_hw=np.full((b, 2), size, np.int32),
        image_id=np.arange(b, dtype=np.int32), scale=np.ones(b, np.float32),
        valid=np.ones(b, bool), gt_boxes=np.zeros((b, g, 4), np.float32),
        gt_classes=np.zeros((b, g), np.int32), gt_masks=np.zeros((b, g, s, s), np.uint8))
    yy, xx = np.mgrid[:s, :s]
    for i in range(b):
      for k in range(1 + i % 3):
        x1, y1 = rng.uniform(0, 40, 2)
        w, h = rng.uniform(8, 24, 2)
        batch["gt_boxes"][i, k] = [x1, y1, x1 + w, y1 + h]
        batch["gt_classes"][i, k] = rng.integers(1, 4)
        batch["gt_masks"][i, k] = ((yy - s / 2) ** 2 + (xx - s / 2) ** 2 < (s / 2.2) ** 2)
    return batch

  seed = int(np.random.SeedSequence().entropy % 2**31)
  rng = np.random.default_rng(seed)
  batches = [make_batch(rng) for _ in range(4)]
  c = tiny_shapes.get_config("4")
  c.model = tiny_shapes.tiny_model("GN")
  sched = optim.resolve_schedule(c.schedule, c.optim, 8)
  sample = train.init_batch(batches[0])
  parts = {n: train.build_parts(c, sched, trainer.make_mesh(jax.devices()[:n]), sample)
           for n in (8, 4, 2)}

  def run(p, state, ks):
    losses = []
    for k in ks:
      state, m = p.train_step(state, trainer.to_global(batches[k], p.batch_sharding))
      losses.append(float(m["total_loss"]))
    return state, losses

  ckpt_dir = sys.argv[2]
  state, _ = run(parts[8], parts[8].init(jax.random.PRNGKey(0), sample), [0, 1])
  saver = checkpoints.Saver(checkpoints.make_manager(ckpt_dir, keep=1, async_save=True), ckpt_dir)
  saver.save(2, state)
  assert saver.finish() == 2
  saver.close()
  at2 = jax.device_get(state["params"])
  ref, ref_losses = run(parts[8], state, [2, 3])
  ref = jax.device_get(ref["params"])
  p0 = jax.tree_util.tree_leaves(at2)
  update_max = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(ref), p0))
  report = {"seed": seed, "ref_losses": ref_losses, "update_max": update_max}
  for n in (4, 2):
    target = trainer.abstract_state_with_shardings(parts[n])
    restored, step = checkpoints.restore_latest(ckpt_dir, target)
    assert step == 2 and int(restored["step"]) == 2
    assert {d.id for d in restored["params"]["roi_heads"]["box_predictor"]["cls_score"]["kernel"]
            .sharding.device_set} == {d.id for d in jax.devices()[:n]}
    new, losses = run(parts[n], restored, [2, 3])
    new = jax.device_get(new["params"])
    worst_update = max(float(np.abs((a - b0) - (r - b0)).max()) / max(update_max, 1e-12)
                       for a, r, b0 in zip(jax.tree_util.tree_leaves(new),
                                           jax.tree_util.tree_leaves(ref), p0))
    report[n] = dict(losses=losses, worst_update=worst_update)
  print("REPORT " + json.dumps(report))
""")


@pytest.mark.slow
def test_checkpoint_of_8_devices_resumes_on_4_and_2(tmp_path):
  script = tmp_path / "changed_slice.py"
  script.write_text(_SCRIPT)
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
  )
  proc = subprocess.run(
    [sys.executable, str(script), ROOT, str(tmp_path / "checkpoints")],
    env=env,
    capture_output=True,
    text=True,
    timeout=1500,
    check=False,
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
  report = json.loads(lines[0][len("REPORT ") :])
  assert report["update_max"] > 1e-4, report  # the two steps moved the parameters
  for n in ("4", "2"):
    r = report[n]
    for a, b in zip(r["losses"], report["ref_losses"]):
      assert abs(a - b) <= 1e-5 * abs(b), (n, report)
    assert r["worst_update"] <= 1e-3, (n, report)
