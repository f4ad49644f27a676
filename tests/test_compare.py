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


def _results(rng, unit, arms=("finetune", "scratch"), seeds=(0,), multiples=(1, 2, 3, 4, 6)):
  """Results of both arms to max(multiples), one hand-made run per seed, evaluated every half
  unit."""
  out = {"unit_steps": unit, "command": "python -m rethink_jax.compare --x", "wall_s": 12.0}
  out["arms"] = {}
  for a in arms:
    runs = [
      {
        "seed": s,
        "curve": _curve(rng, unit * max(multiples), unit // 2, rng.uniform(30, 70)),
        "wall_s": 3.0,
      }
      for s in seeds
    ]
    out["arms"][a] = {
      "multiples": list(multiples),
      "config": {"arm": a},
      "wall_s": 3.0 * len(seeds),
      "runs": runs,
      "curve": compare.mean_curve([r["curve"] for r in runs]),
    }
  return out


def _row(md, section, label):
  """The cells of the row `label` in the table under heading `section` of results.md."""
  text = md.split(section, 1)[1]
  line = next(l for l in text.splitlines() if l.startswith(f"| {label} |"))
  return [c.strip() for c in line.strip("|").split("|")][1:]


def test_report_from_hand_made_curves(tmp_path):
  rng = np.random.default_rng()
  multiples = (1, 2, 3, 4, 6)
  res = _results(rng, unit=int(rng.integers(2, 20)) * 10, multiples=multiples)
  compare.write_report(res, str(tmp_path))
  loaded = compare.load_results(str(tmp_path))
  assert loaded["arms"].keys() == res["arms"].keys()
  md = (tmp_path / "results.md").read_text()
  unit = res["unit_steps"]
  ft, sc = (res["arms"][a]["curve"] for a in ("finetune", "scratch"))
  for key, name in (("bbox/AP", "Box AP"), ("segm/AP", "Mask AP")):
    section = f"## {name} at each schedule (Table 1)"
    # Both arms and the gap are filled at every multiple, read off the curves at k x unit.
    for arm, curve in (("finetune", ft), ("scratch", sc)):
      cells = _row(md, section, compare._LABELS[arm])  # pylint: disable=protected-access
      assert cells == [f"{compare.ap_at(curve, m * unit, key):.1f}" for m in multiples]
    gap = _row(md, section, "gap (scratch - fine-tuned)")
    expected = [
      compare.ap_at(sc, m * unit, key) - compare.ap_at(ft, m * unit, key) for m in multiples
    ]
    assert gap == [f"{g:+.1f}" for g in expected]
  # Table 2: each arm's best box and mask AP, with AP50 and AP75 at that evaluation.
  for arm, curve in (("finetune", ft), ("scratch", sc)):
    cells = _row(md, "(Table 2)", compare._LABELS[arm])  # pylint: disable=protected-access
    best_box = max(p["bbox/AP"] for p in curve)
    best_mask = max(p["segm/AP"] for p in curve)
    assert cells[0] == f"{best_box:.1f}" and cells[4] == f"{best_mask:.1f}", cells
    at = next(p["step"] for p in curve if p["segm/AP"] == best_mask)
    assert cells[7].startswith(f"{at} (")
  end = 6 * unit
  gap_end = compare.ap_at(sc, end, "segm/AP") - compare.ap_at(ft, end, "segm/AP")
  assert f"gap (scratch - pre-trained) = {gap_end:+.1f}" in md
  png = (tmp_path / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_of_several_seeds_is_mean_and_std(tmp_path):
  rng = np.random.default_rng()
  unit, multiples, seeds = 40, (1, 2, 4), (3, 4, 5)
  res = _results(rng, unit, seeds=seeds, multiples=multiples)
  compare.write_report(res, str(tmp_path))
  md = (tmp_path / "results.md").read_text()
  runs = {a: res["arms"][a]["runs"] for a in compare.ARMS}
  for key, name in (("bbox/AP", "Box AP"), ("segm/AP", "Mask AP")):
    section = f"## {name} at each schedule (Table 1)"
    per_seed = {
      a: np.array([[compare.ap_at(r["curve"], m * unit, key) for m in multiples] for r in runs[a]])
      for a in compare.ARMS
    }
    for arm in compare.ARMS:
      cells = _row(md, section, compare._LABELS[arm])  # pylint: disable=protected-access
      mean, std = per_seed[arm].mean(0), per_seed[arm].std(0, ddof=1)
      assert cells == [f"{m:.1f} ± {s:.1f}" for m, s in zip(mean, std)]
    # The gap pairs the arms' runs of the same seed.
    diff = per_seed["scratch"] - per_seed["finetune"]
    cells = _row(md, section, "gap (scratch - fine-tuned)")
    assert cells == [f"{m:+.1f} ± {s:.1f}" for m, s in zip(diff.mean(0), diff.std(0, ddof=1))]
  # Each seed's own values are listed too.
  first = runs["scratch"][1]
  cells = _row(md, "## Each seed", compare._LABELS["scratch"])  # pylint: disable=protected-access
  assert any(l.startswith(f"| random init | {first['seed']} |") for l in md.splitlines())
  assert len(cells) == 2 + len(multiples)
  assert "over 3 seeds (3, 4, 5)" in md
  # The mean curve holds the mean and std at the steps every seed has.
  mc = res["arms"]["finetune"]["curve"]
  point = mc[len(mc) // 2]
  values = [next(p for p in r["curve"] if p["step"] == point["step"]) for r in runs["finetune"]]
  assert point["segm/AP"] == pytest.approx(np.mean([v["segm/AP"] for v in values]))
  assert point["std"]["segm/AP"] == pytest.approx(np.std([v["segm/AP"] for v in values], ddof=1))
  png = (tmp_path / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_of_keypoint_arms_without_masks(tmp_path):
  """A keypoint model without a mask head: box and keypoint AP, no mask columns or panels."""
  rng = np.random.default_rng()
  unit, multiples = 20, (1, 2, 3)
  res = _results(rng, unit, seeds=(0, 1), multiples=multiples)
  for r in res["arms"].values():
    for run in r["runs"]:
      for p in run["curve"]:
        p["keypoints/AP"] = p.pop("segm/AP") + 5.0
        p["keypoints/AP50"] = p["keypoints/AP"] + 10.0
    r["curve"] = compare.mean_curve([run["curve"] for run in r["runs"]])
  assert compare.metrics_of(res) == ("bbox/AP", "keypoints/AP")
  compare.write_report(res, str(tmp_path))
  md = (tmp_path / "results.md").read_text()
  assert "Mask AP" not in md and "mask AP" not in md
  section = "## Keypoint AP at each schedule (Table 1)"
  for arm in compare.ARMS:
    runs = res["arms"][arm]["runs"]
    values = np.array(
      [[compare.ap_at(r["curve"], m * unit, "keypoints/AP") for m in multiples] for r in runs]
    )
    cells = _row(md, section, compare._LABELS[arm])  # pylint: disable=protected-access
    assert cells == [f"{m:.1f} ± {s:.1f}" for m, s in zip(values.mean(0), values.std(0, ddof=1))]
  header = next(l for l in md.split("(Table 2)", 1)[1].splitlines() if l.startswith("| arm |"))
  assert header.split(" | ")[1:5] == ["box AP", "AP50", "AP75", "at iteration"]
  assert header.split(" | ")[5:7] == ["keypoint AP", "AP50"]
  for arm in compare.ARMS:
    curve = res["arms"][arm]["curve"]
    best = max(curve, key=lambda p: (p["keypoints/AP"], -p["step"]))
    cells = _row(md, "(Table 2)", compare._LABELS[arm])  # pylint: disable=protected-access
    assert cells[4].startswith(f"{best['keypoints/AP']:.1f} ± "), cells
    assert cells[5].startswith(f"{best['keypoints/AP50']:.1f} ± "), cells
  assert "- keypoints/AP at 3x: random init" in md
  assert "Box AP / keypoint AP at each schedule." in md
  png = (tmp_path / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  # With masks too: three tables.
  res["arms"]["finetune"]["runs"][0]["curve"][0]["segm/AP"] = 1.0
  assert compare.metrics_of(res) == ("bbox/AP", "segm/AP", "keypoints/AP")


def test_mean_curve_keeps_the_steps_every_seed_has():
  a = [{"step": s, "segm/AP": float(s), "wall_s": 1.0} for s in (2, 4, 6)]
  b = [{"step": s, "segm/AP": float(s) + 2, "wall_s": 3.0} for s in (2, 4)]
  mc = compare.mean_curve([a, b])
  assert [p["step"] for p in mc] == [2, 4]
  assert mc[1]["segm/AP"] == 5.0 and mc[1]["wall_s"] == 2.0
  assert mc[1]["std"]["segm/AP"] == pytest.approx(np.sqrt(2.0))
  assert compare.mean_curve([a]) == a


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
  # Both arms train to the longest multiple and are evaluated at every multiple.
  assert ft.schedule.total_steps == sc.schedule.total_steps == 6 * unit
  assert tuple(sc.schedule.decay_steps) == compare.decay_steps(6 * unit, unit)
  assert all(m * unit % sc.eval_every == 0 for m in c.compare.multiples)
  assert ft.seed == sc.seed == c.seed and compare.arm_config(c, "scratch", seed=7).seed == 7
  assert "compare" not in ft and "compare" not in sc
  assert tuple(c.data.pixel_std) == tuple(sc.data.pixel_std)  # the input config is untouched


def test_evaluations_fall_on_every_multiple():
  from configs import compare_tiny  # pylint: disable=g-import-not-at-top

  c = compare_tiny.get_config()
  c.compare.unit_steps = 10
  c.compare.multiples = (0.5, 1, 2.5)
  c.eval_every = 10
  sc = compare.arm_config(c, "scratch")
  assert sc.schedule.total_steps == 25 and sc.eval_every == 5
  c.compare.multiples = (2, 4)
  c.eval_every = 0  # no periodic evaluation: still one at every multiple
  assert compare.arm_config(c, "finetune").eval_every == 20
  c.compare.multiples = ()
  with pytest.raises(ValueError, match="multiples"):
    compare.arm_config(c, "finetune")


def test_derived_seeds_differ_per_stream_and_seed():
  seeds = {(s, k): compare.derived_seed(s, k) for s in range(4) for k in ("pretrain", "subset")}
  assert len(set(seeds.values())) == len(seeds)
  assert seeds == {(s, k): compare.derived_seed(s, k) for s, k in seeds}  # a function of both
  assert all(0 <= v < 2**31 for v in seeds.values())


def _subset_ids(data_config, steps=3):
  """Image ids of the training pool and of the first `steps` batches of the stream."""
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  builder = pipeline.get_builder(data_config)
  ids = pipeline.records_meta(builder, "train")["image_id"]
  pool = set(int(ids[i]) for i in pipeline.train_pool(data_config, builder))
  it = stream.make_train_iterator(data_config, 2, seed=0, process_index=0, process_count=1)
  seen = [int(i) for _ in range(steps) for i in next(it)["image_id"]]
  return pool, seen


def test_train_images_selects_the_same_subset_in_both_arms(shapes_dir):
  from configs import compare_tiny  # pylint: disable=g-import-not-at-top

  c = compare_tiny.get_config()
  c.data.data_dir = shapes_dir
  c.data.num_parallel_calls = 1
  c.compare.train_images = 6
  ft = compare.arm_config(c, "finetune", init_from="somewhere")
  sc = compare.arm_config(c, "scratch")
  assert ft.data.num_train_images == sc.data.num_train_images == 6
  assert ft.data.subset_seed == sc.data.subset_seed == compare.derived_seed(c.seed, "subset")
  pool_ft, seen_ft = _subset_ids(ft.data)
  pool_sc, seen_sc = _subset_ids(sc.data)
  assert len(pool_ft) == 6 and pool_ft == pool_sc
  assert seen_ft == seen_sc and set(seen_ft) <= pool_ft  # 6 batches of 2 cover the subset
  assert set(seen_ft) == pool_ft
  # Another seed of the same replica set (compare.seeds) keeps the subset: derived from config.seed.
  assert compare.arm_config(c, "scratch", seed=c.seed + 1).data.subset_seed == sc.data.subset_seed
  # K and config.seed change which images.
  c.compare.train_images = 7
  pool_7, _ = _subset_ids(compare.arm_config(c, "scratch").data, steps=0)
  assert len(pool_7) == 7
  c.compare.train_images = 6
  c.seed = 1
  pool_s1, _ = _subset_ids(compare.arm_config(c, "scratch").data, steps=0)
  assert len(pool_s1) == 6 and pool_s1 != pool_ft
  # 0 = every training image.
  c.compare.train_images = 0
  pool_all, _ = _subset_ids(compare.arm_config(c, "scratch").data, steps=0)
  assert pool_ft < pool_all and pool_7 < pool_all


def test_a_workdir_of_another_seed_is_refused(tmp_path):
  from configs import compare_tiny  # pylint: disable=g-import-not-at-top

  (tmp_path / "config.json").write_text(json.dumps({"seed": 3}))
  with pytest.raises(ValueError, match="seed 3, not 0"):
    compare.run_arm(compare_tiny.get_config(), "scratch", str(tmp_path))


def test_lessdata_config_sizes():
  from configs import compare_shapes_lessdata  # pylint: disable=g-import-not-at-top

  assert compare_shapes_lessdata.get_config("10pct").compare.train_images == 160
  assert compare_shapes_lessdata.get_config("1pct").compare.train_images == 16
  assert compare_shapes_lessdata.get_config("40").compare.train_images == 40
  with pytest.raises(ValueError, match="FRACTION"):
    compare_shapes_lessdata.get_config("half")


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


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  """A tfds data dir holding shapes_instances/tiny (the classification set is generated by the
  first pre-training that needs it)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp("tfds_shapes"))
  shapes.ShapesInstances(config="tiny", data_dir=data_dir).download_and_prepare()
  return data_dir


def _tiny_args(data_dir, workdir, *extra):
  return [
    "--config",
    os.path.join(ROOT, "configs", "compare_tiny.py"),
    f"--config.data.data_dir={data_dir}",
    "--workdir",
    str(workdir),
    *extra,
  ]


@pytest.fixture(scope="module")
def separate_arms(shapes_dir, tmp_path_factory):
  """The tiny preset's arms run separately (as on two machines): {"ft": dir, "sc": dir}."""
  root = tmp_path_factory.mktemp("separate")
  _run_compare(_tiny_args(shapes_dir, root / "ft", "--arm", "finetune"))
  _run_compare(_tiny_args(shapes_dir, root / "sc", "--arm", "scratch"))
  return {"ft": root / "ft", "sc": root / "sc", "root": root}


@pytest.fixture(scope="module")
def two_seeds(shapes_dir, tmp_path_factory):
  """The tiny preset with --config.compare.seeds=2 (seeds 0 and 1), both arms in one process."""
  workdir = tmp_path_factory.mktemp("two_seeds") / "run"
  _run_compare(_tiny_args(shapes_dir, workdir, "--config.compare.seeds=2"))
  return workdir


@pytest.mark.slow
def test_smoke_both_arms_separately_then_merged(separate_arms):
  """--arm finetune and --arm scratch in two workdirs (as on two machines), then --merge."""
  ft = _check_outputs(separate_arms["ft"], ["finetune"])
  assert ft["arms"]["finetune"]["pretrain"]["source"] == "pretrain:shapes_classification"
  sc = _check_outputs(separate_arms["sc"], ["scratch"])
  # Both arms train to the longest multiple and are evaluated at every multiple.
  unit = sc["unit_steps"]
  for r in (ft["arms"]["finetune"], sc["arms"]["scratch"]):
    assert r["multiples"] == [1, 2]
    assert {m * unit for m in r["multiples"]} <= {p["step"] for p in r["curve"]}
    assert r["curve"][-1]["step"] == 2 * unit
  merged_dir = separate_arms["root"] / "merged"
  _run_compare(
    ["--workdir", str(merged_dir), "--merge", str(separate_arms["ft"]), str(separate_arms["sc"])]
  )
  merged = _check_outputs(merged_dir, ["finetune", "scratch"])
  assert merged["arms"]["scratch"]["curve"] == sc["arms"]["scratch"]["curve"]
  md = (merged_dir / "results.md").read_text()
  assert "Final gap" in md
  for name in ("Box AP", "Mask AP"):
    gap = _row(md, f"## {name} at each schedule (Table 1)", "gap (scratch - fine-tuned)")
    assert len(gap) == 2 and "–" not in gap, gap
  test_visualize.check_comparison_pictures(merged_dir, ["finetune", "scratch"])


# Fields of a run that depend on the wall clock, not on the computation.
_TIMING = ("wall_s", "eval_s")


def _without_timing(curve):
  return [{k: v for k, v in p.items() if k not in _TIMING} for p in curve]


@pytest.mark.slow
def test_same_seed_same_run_other_seed_other_run(separate_arms, two_seeds):
  """Two runs of the tiny preset in fresh workdirs and processes (the arms run separately, and
  seed 0 of a two-seed run) give identical curves and training losses, pre-training included:
  XLA:CPU in one process, the seeded tf.data pipelines and pycocotools are deterministic, so
  no tolerance is allowed. Seed 1 gives a different run."""
  res = json.loads((two_seeds / "results.json").read_text())
  for arm, d in (("finetune", "ft"), ("scratch", "sc")):
    single = json.loads((separate_arms[d] / "results.json").read_text())["arms"][arm]
    seed0, seed1 = res["arms"][arm]["runs"]
    assert (single["runs"][0]["seed"], seed0["seed"], seed1["seed"]) == (0, 0, 1)
    assert _without_timing(seed0["curve"]) == _without_timing(single["runs"][0]["curve"])
    assert seed0["train_loss"] == single["runs"][0]["train_loss"] and seed0["train_loss"]
    # Another seed: other initialization, sampling and data order, hence other losses.
    assert [h["step"] for h in seed1["train_loss"]] == [h["step"] for h in seed0["train_loss"]]
    assert all(
      a["total_loss"] != b["total_loss"] for a, b in zip(seed0["train_loss"], seed1["train_loss"])
    )
  pre = [r["pretrain"] for r in res["arms"]["finetune"]["runs"]]
  single_pre = json.loads((separate_arms["ft"] / "results.json").read_text())["arms"]["finetune"]
  assert pre[0]["seed"] == single_pre["pretrain"]["seed"] == compare.derived_seed(0, "pretrain")
  assert pre[0]["top1"] == single_pre["pretrain"]["top1"]
  assert pre[1]["seed"] == compare.derived_seed(1, "pretrain") != pre[0]["seed"]


@pytest.mark.slow
def test_two_seeds_report_mean_and_std(two_seeds):
  res = _check_outputs(two_seeds, ["finetune", "scratch"])
  for arm in compare.ARMS:
    r = res["arms"][arm]
    assert r["seeds"] == [0, 1]
    # One workdir per seed (the single-seed layout has none).
    assert [run["workdir"] for run in r["runs"]] == [
      str(two_seeds / arm / f"seed_{s}") for s in (0, 1)
    ]
    for s in (0, 1):
      assert (two_seeds / arm / f"seed_{s}" / "eval_curve.json").exists()
    assert r["curve"] == compare.mean_curve([run["curve"] for run in r["runs"]])
  for s in (0, 1):
    assert (two_seeds / "pretrain" / f"seed_{s}" / "backbone" / "meta.json").exists()
  md = (two_seeds / "results.md").read_text()
  assert "over 2 seeds (0, 1)" in md and "## Each seed" in md
  unit = res["unit_steps"]
  for key, name in (("bbox/AP", "Box AP"), ("segm/AP", "Mask AP")):
    runs = res["arms"]["scratch"]["runs"]
    values = [[compare.ap_at(run["curve"], m * unit, key) for run in runs] for m in (1, 2)]
    cells = _row(md, f"## {name} at each schedule (Table 1)", "random init")
    assert cells == [f"{np.mean(v):.1f} ± {np.std(v, ddof=1):.1f}" for v in values]


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
