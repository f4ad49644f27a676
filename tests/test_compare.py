"""Tests of rethink_jax.compare: the report from hand-made curves, merging, a smoke run of both
arms on the tiny preset, and that README's commands are the Makefile's."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from rethink_jax import compare
from tests import test_visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _curve(rng, end, every, top):
  """A rising AP curve with noise: list of {step, images_seen, bbox/AP, segm/AP, wall_s}."""
  rate = rng.uniform(0.5, 3.0)
  out = []
  for s in range(every, end + 1, every):
    ap = top * (1 - np.exp(-rate * s / end)) + rng.uniform(0, 1)
    out.append(
      {
        "step": s,
        "images_seen": 4 * s,
        "bbox/AP": float(ap),
        "segm/AP": float(0.9 * ap),
        "wall_s": 0.1 * s,
      }
    )
  return out


def _results(rng, unit, arms=("finetune", "scratch")):
  mult = {"finetune": [1, 2], "scratch": [1, 2, 3, 4, 6]}
  return {
    "unit_steps": unit,
    "command": "python -m rethink_jax.compare --x",
    "wall_s": 12.0,
    "arms": {
      a: {
        "multiples": mult[a],
        "config": {"arm": a},
        "wall_s": 3.0,
        "curve": _curve(rng, unit * max(mult[a]), unit // 2, rng.uniform(30, 70)),
      }
      for a in arms
    },
  }


def test_ap_at_reads_last_eval_at_or_before_step():
  curve = [{"step": 10, "segm/AP": 1.0}, {"step": 30, "segm/AP": 3.0}, {"step": 20, "segm/AP": 2.0}]
  assert compare.ap_at(curve, 5, "segm/AP") is None
  assert compare.ap_at(curve, 20, "segm/AP") == 2.0
  assert compare.ap_at(curve, 29, "segm/AP") == 2.0
  assert compare.ap_at(curve, 100, "segm/AP") == 3.0
  assert compare.first_step_reaching(curve, "segm/AP", 2.5)["step"] == 30
  assert compare.first_step_reaching(curve, "segm/AP", 9.0) is None


def test_decay_steps_follow_the_papers_rule():
  # 1x = 90k: decays at 60k and 80k; 3x: at 210k and 250k.
  assert compare.decay_steps(90_000, 90_000) == (30_000, 70_000)
  assert compare.decay_steps(270_000, 90_000) == (210_000, 250_000)
  assert compare.decay_steps(900, 150) == (800, 867)


def test_report_from_hand_made_curves(tmp_path):
  rng = np.random.default_rng()
  res = _results(rng, unit=int(rng.integers(2, 20)) * 10)
  compare.write_report(res, str(tmp_path))
  loaded = compare.load_results(str(tmp_path))
  assert loaded["arms"].keys() == res["arms"].keys()
  md = (tmp_path / "results.md").read_text()
  unit = res["unit_steps"]
  for arm, r in res["arms"].items():
    label = compare._LABELS[arm]  # pylint: disable=protected-access
    row = next(l for l in md.splitlines() if l.startswith(f"| {label} |"))
    # Table 1: the 1x cell is the curve's AP at step unit (bbox table comes first).
    assert f"{compare.ap_at(r['curve'], unit, 'bbox/AP'):.1f}" in row
  ft_end = compare.ap_at(res["arms"]["finetune"]["curve"], 2 * unit, "segm/AP")
  sc_end = compare.ap_at(res["arms"]["scratch"]["curve"], 6 * unit, "segm/AP")
  assert f"gap (scratch - pre-trained) = {sc_end - ft_end:+.1f}" in md
  png = (tmp_path / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_merge_combines_arms_and_refuses_duplicates(tmp_path):
  rng = np.random.default_rng()
  a = _results(rng, 50, arms=("finetune",))
  b = _results(rng, 50, arms=("scratch",))
  merged = compare.merge_results([a, b])
  assert set(merged["arms"]) == {"finetune", "scratch"}
  assert merged["arms"]["scratch"]["curve"] == b["arms"]["scratch"]["curve"]
  with pytest.raises(ValueError, match="more than one"):
    compare.merge_results([a, a])
  with pytest.raises(ValueError, match="schedule units"):
    compare.merge_results([a, _results(rng, 60, arms=("scratch",))])


def test_arm_config_applies_the_arms_overrides():
  from configs import compare_coco  # pylint: disable=g-import-not-at-top

  c = compare_coco.get_config()
  unit = c.compare.unit_steps
  ft = compare.arm_config(c, "finetune", init_from="weights/R-50-GN")
  sc = compare.arm_config(c, "scratch")
  # The override replaces the pixel fields only; the rest of config.data stays.
  assert tuple(ft.data.pixel_std) == (1.0, 1.0, 1.0) and ft.data.input_format == "BGR"
  assert tuple(sc.data.pixel_std) == tuple(c.data.pixel_std) != (1.0, 1.0, 1.0)
  assert ft.data.max_size == sc.data.max_size == c.data.max_size
  assert ft.require_init_from and not sc.require_init_from
  assert ft.init_from == "weights/R-50-GN" and sc.init_from == ""
  assert ft.schedule.total_steps == 3 * unit and sc.schedule.total_steps == 6 * unit
  assert tuple(sc.schedule.decay_steps) == compare.decay_steps(6 * unit, unit)
  assert "compare" not in ft and "compare" not in sc
  assert tuple(c.data.pixel_std) == tuple(sc.data.pixel_std)  # the input config is untouched


def test_curve_is_the_trainers_sorted_by_step(tmp_path):
  from rethink_jax import train  # pylint: disable=g-import-not-at-top

  assert compare._curve_of(str(tmp_path)) == []  # pylint: disable=protected-access
  points = [{"step": s, "segm/AP": float(s)} for s in (8, 2, 4)]
  (tmp_path / train.CURVE_FILE).write_text(json.dumps(points))
  curve = compare._curve_of(str(tmp_path))  # pylint: disable=protected-access
  assert [p["step"] for p in curve] == [2, 4, 8]


def _run_compare(args, timeout=2400):
  cmd = [sys.executable, "-m", "rethink_jax.compare", *args]
  proc = subprocess.run(
    cmd,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  if proc.returncode:
    raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
  return proc.stdout


def _check_outputs(d, arms):
  res = json.loads((d / "results.json").read_text())
  assert set(res["arms"]) == set(arms)
  for arm in arms:
    r = res["arms"][arm]
    steps = [p["step"] for p in r["curve"]]
    assert len(steps) >= 2 and steps == sorted(set(steps)), steps
    for p in r["curve"]:
      assert {"step", "images_seen", "bbox/AP", "segm/AP", "wall_s"} <= set(p)
      assert 0.0 <= p["segm/AP"] <= 100.0
    assert r["config"]
  md = (d / "results.md").read_text()
  for arm in arms:
    assert compare._LABELS[arm] in md  # pylint: disable=protected-access
  assert (d / "curves.png").read_bytes()[:4] == b"\x89PNG"
  return res


@pytest.mark.slow
def test_smoke_both_arms_separately_then_merged(tmp_path):
  """--arm finetune and --arm scratch in two workdirs (as on two machines), then --merge."""
  data_dir = tmp_path / "tfds"
  common = [
    "--config",
    os.path.join(ROOT, "configs", "compare_tiny.py"),
    f"--config.data.data_dir={data_dir}",
  ]
  _run_compare([*common, "--workdir", str(tmp_path / "ft"), "--arm", "finetune"])
  ft = _check_outputs(tmp_path / "ft", ["finetune"])
  assert ft["arms"]["finetune"]["pretrain"]["source"] == "pretrain:shapes_classification"
  _run_compare([*common, "--workdir", str(tmp_path / "sc"), "--arm", "scratch"])
  sc = _check_outputs(tmp_path / "sc", ["scratch"])
  # The scratch arm trains longer than the fine-tune arm.
  assert sc["arms"]["scratch"]["curve"][-1]["step"] > ft["arms"]["finetune"]["curve"][-1]["step"]
  _run_compare(
    ["--workdir", str(tmp_path / "merged"), "--merge", str(tmp_path / "ft"), str(tmp_path / "sc")]
  )
  merged = _check_outputs(tmp_path / "merged", ["finetune", "scratch"])
  assert merged["arms"]["scratch"]["curve"] == sc["arms"]["scratch"]["curve"]
  assert "Final gap" in (tmp_path / "merged" / "results.md").read_text()
  test_visualize.check_comparison_pictures(tmp_path / "merged", ["finetune", "scratch"])


def _make_targets():
  text = open(os.path.join(ROOT, "Makefile")).read()
  targets = {}
  for m in re.finditer(r"^([a-z][\w-]*):[^\n]*\n((?:\t[^\n]*\n?)*)", text, re.M):
    targets[m.group(1)] = [l.strip() for l in m.group(2).splitlines()]
  variables = dict(re.findall(r"^(\w+)\s*:=\s*(.*)$", text, re.M))
  return targets, variables


def test_readme_commands_are_the_makefiles():
  readme = open(os.path.join(ROOT, "README.md")).read()
  targets, variables = _make_targets()
  # The fresh-machine commands come first, as make targets the Makefile defines.
  first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, re.S).group(1)
  commands = [l.strip() for l in first_block.splitlines() if l.strip() and not l.startswith("#")]
  assert "make demo" in commands and "make test" in commands, commands
  for cmd in re.findall(r"^\s*make ([\w-]+)", readme, re.M):
    assert cmd in targets, f"README runs `make {cmd}`, which the Makefile does not define"
  # What README says `make demo` runs is the Makefile's demo recipe (with $(PY) expanded).
  demo = [l for l in targets["demo"] if "rethink_jax" in l]
  assert demo, targets["demo"]
  expanded = demo[0].replace("$(PY)", variables["PY"].replace("$(VENV)", variables["VENV"]))
  assert expanded in readme, expanded
  test_recipe = [l for l in targets["test"] if "pytest" in l][0]
  assert test_recipe.replace("$(PY)", ".venv/bin/python") in readme
  # The demo's config and the compare module it names exist.
  assert os.path.exists(os.path.join(ROOT, "configs", "compare_shapes.py"))
  # The results section shows a committed plot.
  for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
    assert os.path.exists(os.path.join(ROOT, img)), img
