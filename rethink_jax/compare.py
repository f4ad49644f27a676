r"""The paper's comparison: random initialization vs pre-training + fine-tuning.

Runs the two arms of "Rethinking ImageNet Pre-training" on the same data and the same evaluation:

- fine-tune arm: a backbone pre-trained on a classification set (on the embedded default,
  pre-trained in this run on `shapes_classification` by rethink_jax/pretrain.py; on COCO,
  converted ImageNet weights given as `config.compare.pretrained_backbone`), then the detector;
- scratch arm: the same detector from random initialization.

Both arms train with the same hyper-parameters (the paper tunes them on the pre-trained arm and
reuses them from scratch; `compare.{arm}_overrides` may only adapt the input to the weights'
pixel format) to the longest of `config.compare.multiples` and are evaluated at every multiple
(and every `config.eval_every` steps) on the same validation split, so each yields an
AP-versus-iteration curve and a value at every column of the paper's Table 1. A "schedule
multiple" is `config.compare.unit_steps` iterations (the paper's 1x = 90k iterations at batch 16;
the embedded demo defines a much smaller unit). Each arm runs ONE training to its longest
multiple; the LR decays of the paper's rule (x0.1 at the last 2/3 and the last 2/9 of a unit) sit
at the end of that run, and the AP "at kx" is read off the curve at step k * unit_steps.

Seeds. Every random source derives from the top-level `config.seed` (S):
  - detector training of seed replica i (both arms; i < compare.seeds): config.seed = S + i,
    which seeds the initialization, the sampling keys of the train step, the data order and the
    augmentation (rethink_jax/train.py, rethink_jax/data/stream.py);
  - the pre-training of replica i: derived_seed(S + i, "pretrain") (initialization, shuffling and
    flips of rethink_jax/pretrain.py), unless compare.pretrain.seed pins it;
  - the less-data subset (compare.train_images = K > 0): data.subset_seed = derived_seed(S,
    "subset"): the same K images for both arms and every replica.
With compare.seeds = N > 1 each replica pre-trains its own backbone: the pre-training outcome is
the largest source of variance of the fine-tune arm, so one shared backbone would hide it (a
given compare.pretrained_backbone is shared: its training is not part of the run).

Less data (the paper's section 5). compare.train_images = K trains both arms on the same K-image
subset of the training split; the pre-training set is unchanged, and the schedule unit stays the
full set's (compare.scale_unit_to_data measures the whole split), as the paper keeps iteration
counts of the full-data order (10k COCO images: 60k / 220k iterations) instead of epochs.

Usage:
  python -m rethink_jax.compare --config configs/compare_shapes.py --workdir runs/compare
  python -m rethink_jax.compare --config configs/compare_shapes.py --workdir runs/a --arm scratch
  python -m rethink_jax.compare --config configs/compare_shapes.py --workdir runs/b --arm finetune
  python -m rethink_jax.compare --workdir runs/merged --merge runs/a runs/b
  python -m rethink_jax.compare --config configs/compare_shapes.py --workdir runs/s3 \
      --config.compare.seeds=3

Outputs in --workdir:
  results.json  {"arms": {arm: {"config", "multiples", "unit_steps", "seeds", "curve" (the mean
                over seeds: [{step, images_seen, bbox/AP, segm/AP, keypoints/AP (the tasks
                of the model), ..., wall_s, "std": {metric:
                std} when seeds > 1}]), "runs": [{"seed", "curve", "train_loss", "wall_s",
                "workdir", "pretrain"}], "wall_s", "pretrain" (the first seed's)}},
                "unit_steps", ...}
  results.md    tables like the paper's Tables 1 and 2 (mean +- std over seeds when seeds > 1):
                box AP, mask AP when the model has a mask head, keypoint AP when it has keypoints
  curves.png    AP versus iterations of both arms with the schedule multiples marked (Figure 1),
                one panel per task; mean lines and +-1 std bands when seeds > 1
  predictions.png  six validation images: ground truth | each arm at 1x and at its longest
                multiple (rethink_jax/visualize.py; from the arms' eval_images/ records; masks
                and keypoints drawn where the model predicts them)
  pretrain/, finetune/, scratch/   the runs' own workdirs (checkpoints, TensorBoard events); with
                seeds > 1 one subdirectory seed_<seed> per replica in each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import copy
import json
import math
import os
import sys
import time

import ml_collections
import numpy as np

from rethink_jax import files
from rethink_jax import visualize

ARMS = ("finetune", "scratch")
# The AP of each task, reported for the tasks the arms' curves hold (box AP always).
METRICS = ("bbox/AP", "segm/AP", "keypoints/AP")
_METRIC_NAMES = {"bbox/AP": "Box AP", "segm/AP": "Mask AP", "keypoints/AP": "Keypoint AP"}
_LABELS = {"finetune": "pre-trained + fine-tuned", "scratch": "random init"}
_GAP_LABEL = "gap (scratch - fine-tuned)"
_COLORS = {"finetune": "tab:blue", "scratch": "tab:red"}
# Fixed stream numbers: adding a stream never changes the seeds of another.
_SEED_STREAMS = {"pretrain": 1, "subset": 2}


def _log(msg: str) -> None:
  print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def derived_seed(seed: int, stream: str) -> int:
  """The seed of one random stream ("pretrain" | "subset") of a comparison with top-level seed
  `seed`: a hash of (seed, stream) in [0, 2**31), unrelated to the detector seeds seed, seed + 1.
  """
  state = np.random.SeedSequence([int(seed), _SEED_STREAMS[stream]]).generate_state(1)
  return int(state[0] & 0x7FFFFFFF)


# --------------------------------------------------------------------------------------------
# Reading curves.
# --------------------------------------------------------------------------------------------
def ap_at(curve: Sequence[dict], step: int, key: str) -> float | None:
  """AP of the last evaluation at or before `step` (None when there is none).

  Args:
    curve: list of {"step": int, key: float, ...} sorted by step (unsorted is tolerated).
    step: the iteration to read the curve at.
    key: metric name, e.g. "segm/AP".
  """
  best = None
  for point in sorted(curve, key=lambda p: p["step"]):
    if point["step"] <= step and point.get(key) is not None:
      best = float(point[key])
  return best


def value_at(curve: Sequence[dict], step: int, key: str) -> float | None:
  """ap_at(curve, step, key), or None while the curve has not reached `step`."""
  if not curve or max(p["step"] for p in curve) < step:
    return None
  return ap_at(curve, step, key)


def first_step_reaching(curve: Sequence[dict], key: str, threshold: float) -> dict | None:
  """The first evaluation point whose `key` is >= threshold, or None."""
  for point in sorted(curve, key=lambda p: p["step"]):
    if point.get(key) is not None and float(point[key]) >= threshold:
      return point
  return None


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (ddof 1) of `values`; (None, None) if one is None, the
  std None for a single value."""
  if not values or any(v is None for v in values):
    return None, None
  x = np.asarray(values, np.float64)
  return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else None)


def mean_curve(curves: Sequence[Sequence[dict]]) -> list[dict]:
  """The mean over seeds of per-seed curves, at the steps every curve has.

  Each point holds the mean of every numeric field and, for more than one curve, "std": {metric:
  sample standard deviation} of the COCO metrics (keys with a "/"). A single curve is returned
  unchanged.
  """
  if len(curves) == 1:
    return sorted(curves[0], key=lambda p: p["step"])
  by_step = [{p["step"]: p for p in c} for c in curves]
  common = sorted(set.intersection(*[set(b) for b in by_step])) if by_step else []
  out = []
  for step in common:
    points = [b[step] for b in by_step]
    keys = [k for k in points[0] if k != "step" and all(k in p for p in points)]
    point, std = {"step": step}, {}
    for k in keys:
      values = [p[k] for p in points]
      if not all(v is None or isinstance(v, (int, float)) for v in values):
        continue
      mean, sd = mean_std(values)
      point[k] = mean
      if "/" in k:
        std[k] = sd
    point["std"] = std
    out.append(point)
  return out


def metrics_of(results: dict) -> tuple[str, ...]:
  """The METRICS some arm's curve holds, in METRICS order ("bbox/AP" always): a model without a
  mask head has no "segm/AP", one without keypoints no "keypoints/AP"."""
  keys = {k for r in results["arms"].values() for run in _runs(r) for p in run["curve"] for k in p}
  return tuple(k for k in METRICS if k == "bbox/AP" or k in keys)


def _runs(r: dict) -> list[dict]:
  """The per-seed runs of an arm's results entry (an entry without "runs" is one run)."""
  return r.get("runs") or [{"seed": r.get("seed"), "curve": r.get("curve") or []}]


def _task_name(key: str) -> str:
  """ "box AP", "mask AP", "keypoint AP" (of "bbox/AP", ...): the name inside a sentence."""
  name = _METRIC_NAMES[key]
  return name[0].lower() + name[1:]


def _fmt(x: float | None) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def _fmt_mean_std(mean: float | None, std: float | None, sign: bool = False) -> str:
  if mean is None or math.isnan(mean):
    return "–"
  text = f"{mean:+.1f}" if sign else f"{mean:.1f}"
  return text if std is None else f"{text} ± {std:.1f}"


# --------------------------------------------------------------------------------------------
# Report: results.md.
# --------------------------------------------------------------------------------------------
def _at_multiple(r: dict, unit: int, multiple: float, key: str) -> list[float | None]:
  """Each seed's `key` at `multiple` of `unit` (None where a run has not reached it)."""
  step = int(round(multiple * unit))
  return [value_at(run["curve"], step, key) for run in _runs(r)]


def _gap_cell(ft: dict, sc: dict, unit: int, multiple: float, key: str) -> str:
  """Scratch minus fine-tuned at `multiple`: the mean and std of the per-seed differences when
  both arms ran the same seeds (paired: the same data order), else the difference of means."""
  a, b = _at_multiple(ft, unit, multiple, key), _at_multiple(sc, unit, multiple, key)
  seeds_a, seeds_b = [r.get("seed") for r in _runs(ft)], [r.get("seed") for r in _runs(sc)]
  if seeds_a == seeds_b and None not in a + b:
    return _fmt_mean_std(*mean_std([y - x for x, y in zip(a, b)]), sign=True)
  (ma, _), (mb, _) = mean_std(a), mean_std(b)
  return "–" if ma is None or mb is None else f"{mb - ma:+.1f}"


def _best(curve: Sequence[dict], key: str) -> dict | None:
  """The (mean) curve's point of highest `key`, the earliest of equals."""
  points = [p for p in curve if p.get(key) is not None]
  return max(points, key=lambda p: (p[key], -p["step"])) if points else None


def _point_cell(point: dict, key: str) -> str:
  return _fmt_mean_std(point.get(key), (point.get("std") or {}).get(key))


def results_markdown(results: dict) -> str:
  """The report of `results` (the results.json dict) as markdown.

  Table 1 analogue: box, mask and keypoint AP (those the arms have: metrics_of) of each arm at
  each schedule multiple (read off its curve) and the gap between the arms; Table 2 analogue:
  each arm's best AP of each task with AP50 and AP75 and when. With several seeds every cell is
  mean ± std over them.
  """
  arms = {a: r for a, r in results["arms"].items() if any(run["curve"] for run in _runs(r))}
  unit = int(results["unit_steps"])
  all_multiples = sorted({m for r in arms.values() for m in r["multiples"]})
  num_seeds = max([len(_runs(r)) for r in arms.values()] or [1])
  metrics = metrics_of(results)
  lines = ["# Rethinking ImageNet pre-training: comparison", ""]
  if results.get("command"):
    lines += [f"Command: `{results['command']}`", ""]
  if results.get("partial"):
    lines += [
      "**Partial report**: the evaluations the arms had written when it was made (they "
      "were still running or had been stopped); a schedule not reached yet shows `–`.",
      "",
    ]
  if results.get("wall_s") is not None:
    lines += [f"Total wall time: {results['wall_s'] / 60:.1f} min.", ""]
  lines += [
    f"Schedule unit: 1x = {unit} iterations"
    + (f" at batch {results['batch_size']}" if results.get("batch_size") else "")
    + ". Each arm is one run to its longest schedule; the AP at kx is its evaluation at"
    " iteration k x unit.",
    "",
  ]
  if results.get("train_images"):
    lines += [
      f"Less data: both arms train on the same {results['train_images']} training images "
      f"(subset seed {results.get('subset_seed')}); the pre-training set is unchanged.",
      "",
    ]
  if num_seeds > 1:
    seeds = sorted({run.get("seed") for r in arms.values() for run in _runs(r)}, key=str)
    lines += [
      f"Each cell: mean ± standard deviation (ddof 1) over {num_seeds} seeds "
      f"({', '.join(str(s) for s in seeds)}); each seed's values are under 'Each seed'.",
      "",
    ]

  for key in metrics:
    lines += [f"## {_METRIC_NAMES[key]} at each schedule (Table 1)", ""]
    lines.append("| | " + " | ".join(f"{m:g}x" for m in all_multiples) + " |")
    lines.append("| --- |" + " --- |" * len(all_multiples))
    for arm, r in arms.items():
      cells = [
        _fmt_mean_std(*mean_std(_at_multiple(r, unit, m, key))) if m <= max(r["multiples"]) else ""
        for m in all_multiples
      ]
      lines.append(f"| {_LABELS.get(arm, arm)} | " + " | ".join(cells) + " |")
    if all(a in arms for a in ARMS):
      cells = [_gap_cell(arms["finetune"], arms["scratch"], unit, m, key) for m in all_multiples]
      lines.append(f"| {_GAP_LABEL} | " + " | ".join(cells) + " |")
    lines.append("")

  lines += ["## Best of each arm (Table 2)", ""]
  head = [h for key in metrics for h in (_task_name(key), "AP50", "AP75", "at iteration")]
  lines.append("| arm | " + " | ".join(head) + " |")
  lines.append("| --- |" + " --- |" * len(head))
  for arm, r in arms.items():
    curve = mean_curve([run["curve"] for run in _runs(r)])
    cells = []
    for task in (key.split("/")[0] for key in metrics):
      best = _best(curve, f"{task}/AP")
      if best is None:
        cells += ["–"] * 4
        continue
      cells += [_point_cell(best, f"{task}/{k}") for k in ("AP", "AP50", "AP75")]
      cells.append(f"{best['step']} ({best['step'] / unit:.3g}x)")
    lines.append(f"| {_LABELS.get(arm, arm)} | " + " | ".join(cells) + " |")
  lines.append("")

  if all(a in arms for a in ARMS):
    lines += _summary_lines(arms["finetune"], arms["scratch"], unit, metrics)
  if num_seeds > 1:
    lines += _each_seed_lines(arms, unit, all_multiples, metrics)

  pre = [(run.get("seed"), run.get("pretrain")) for run in _runs(arms.get("finetune", {}))]
  pre = [(s, p) for s, p in pre if p] or [(None, arms.get("finetune", {}).get("pretrain"))]
  if pre[0][1]:
    lines += ["## Pre-training", ""]
    for seed, info in pre:
      lines.append(
        ("" if seed is None or num_seeds == 1 else f"- seed {seed}: ")
        + ", ".join(
          f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in info.items()
        )
      )
    lines.append("")
  for arm, r in arms.items():
    if r.get("wall_s") is not None:
      lines.append(
        f"- {arm}: {len(r['curve'])} evaluations, training + evaluation wall time "
        f"{r['wall_s'] / 60:.1f} min" + (f" ({num_seeds} seeds)" if num_seeds > 1 else "")
      )
  lines.append("")
  return "\n".join(lines)


def _summary_lines(ft: dict, sc: dict, unit: int, metrics: Sequence[str]) -> list[str]:
  """The gap at the longest common schedule, best against best, and when random init catches up
  with the fine-tune arm's shortest schedule (on the mean curves)."""
  lines = ["## Final gap", ""]
  if max(len(_runs(ft)), len(_runs(sc))) > 1:
    lines += ["On the mean curves over seeds.", ""]
  longest = min(max(ft["multiples"]), max(sc["multiples"]))
  end = int(round(longest * unit))
  ft_curve = mean_curve([run["curve"] for run in _runs(ft)])
  sc_curve = mean_curve([run["curve"] for run in _runs(sc)])
  for key in metrics:
    a, b = value_at(ft_curve, end, key), value_at(sc_curve, end, key)
    if a is None or b is None:
      lines.append(f"- {key} at {longest:g}x: not available yet (the arms have not reached it)")
      continue
    lines.append(
      f"- {key} at {longest:g}x: random init {_fmt(b)}, pre-trained {_fmt(a)}, "
      f"gap (scratch - pre-trained) = {b - a:+.1f}"
    )
  for key in metrics:
    ba, bb = _best(ft_curve, key), _best(sc_curve, key)
    if ba is None or bb is None:
      continue
    lines.append(
      f"- best {key}: random init {_fmt(bb[key])} (at {bb['step'] / unit:.3g}x), pre-trained "
      f"{_fmt(ba[key])} (at {ba['step'] / unit:.3g}x), gap = {bb[key] - ba[key]:+.1f}"
    )
  first = min(ft["multiples"])
  for key in metrics:
    a = value_at(ft_curve, int(round(first * unit)), key)
    if a is None:
      continue
    hit = first_step_reaching(sc_curve, key, a)
    where = (
      f"at iteration {hit['step']} ({hit['step'] / unit:.2f}x)"
      if hit
      else "not within its schedule"
    )
    lines.append(
      f"- random init reaches the pre-trained arm's {first:g}x {key} ({_fmt(a)}) {where}"
    )
  lines.append("")
  return lines


def _each_seed_lines(
  arms: dict, unit: int, multiples: Sequence[float], metrics: Sequence[str]
) -> list[str]:
  """Every seed's AP of each task at each multiple (and its pre-training top-1)."""
  names = " / ".join(_task_name(k) for k in metrics)
  lines = ["## Each seed", "", f"{names[0].upper() + names[1:]} at each schedule.", ""]
  lines.append(
    "| arm | seed | pre-training top-1 | " + " | ".join(f"{m:g}x" for m in multiples) + " |"
  )
  lines.append("| --- |" + " --- |" * (len(multiples) + 2))
  for arm, r in arms.items():
    for run in _runs(r):
      top1 = (run.get("pretrain") or {}).get("top1")
      cells = []
      for m in multiples:
        step = int(round(m * unit))
        values = [_fmt(value_at(run["curve"], step, k)) for k in metrics]
        cells.append("" if m > max(r["multiples"]) else " / ".join(values))
      lines.append(
        f"| {_LABELS.get(arm, arm)} | {run.get('seed')} | "
        + ("" if top1 is None else f"{top1:.1f}%")
        + " | "
        + " | ".join(cells)
        + " |"
      )
  lines.append("")
  return lines


# --------------------------------------------------------------------------------------------
# Report: curves.png.
# --------------------------------------------------------------------------------------------
def plot_curves(results: dict, path: str) -> None:
  """Writes AP versus iterations of every arm (one panel per metric) to `path` (PNG).

  Vertical dotted lines mark the schedule multiples, as in the paper's Figure 1. With several
  seeds, each arm's line is the mean over seeds and a band shades mean ± 1 std.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  arms = {a: r for a, r in results["arms"].items() if any(run["curve"] for run in _runs(r))}
  unit = int(results["unit_steps"])
  multiples = sorted({m for r in arms.values() for m in r["multiples"]}) or [1]
  metrics = metrics_of(results)
  fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
  for ax, key in zip(axes[0], metrics):
    for arm, r in arms.items():
      runs = _runs(r)
      curve = mean_curve([run["curve"] for run in runs])
      pts = [p for p in curve if p.get(key) is not None]
      steps = np.asarray([p["step"] for p in pts], np.float64)
      mean = np.asarray([p[key] for p in pts], np.float64)
      label = _LABELS.get(arm, arm) + (f" (mean of {len(runs)} seeds)" if len(runs) > 1 else "")
      ax.plot(steps, mean, marker="o", markersize=3, color=_COLORS.get(arm), label=label)
      std = [(p.get("std") or {}).get(key) for p in pts]
      if len(runs) > 1 and pts and None not in std:
        std = np.asarray(std, np.float64)
        ax.fill_between(steps, mean - std, mean + std, color=_COLORS.get(arm), alpha=0.2, lw=0)
    for m in multiples:
      ax.axvline(m * unit, color="gray", linestyle=":", linewidth=0.8)
      ax.text(
        m * unit,
        1.0,
        f"{m:g}x",
        transform=ax.get_xaxis_transform(),
        ha="center",
        va="bottom",
        fontsize=8,
        color="gray",
      )
    ax.set_xlabel("iterations")
    ax.set_ylabel(key.replace("/", " ") + " (%)")
    ax.set_xlim(0, max(multiples) * unit * 1.02)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
  seeds = max(len(_runs(r)) for r in arms.values()) if arms else 1
  bands = f" (bands: mean ± 1 std over {seeds} seeds)" if seeds > 1 else ""
  fig.suptitle("random init vs pre-trained + fine-tuned" + bands, y=1.04)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def write_report(results: dict, workdir: str) -> None:
  """Writes results.json, results.md, curves.png and predictions.png of `results` into
  `workdir`."""
  files.write_json(os.path.join(workdir, "results.json"), results, indent=1)
  files.atomic_write(os.path.join(workdir, "results.md"), results_markdown(results))
  if any(run["curve"] for r in results["arms"].values() for run in _runs(r)):
    plot_curves(results, os.path.join(workdir, "curves.png"))
  visualize.write_predictions_png(results, workdir)  # the arms' eval_images/ records


def load_results(workdir: str) -> dict:
  """The results.json dict that write_report wrote into `workdir`."""
  path = os.path.join(workdir, "results.json")
  results = files.read_json(path)
  if results is None:
    raise FileNotFoundError(f"{path} not found")
  return results


def merge_results(parts: Sequence[dict]) -> dict:
  """Merges results of arms run separately (e.g. on different machines) into one dict.

  Raises ValueError when two parts hold the same arm or disagree on the schedule unit.
  """
  if not parts:
    raise ValueError("nothing to merge")
  units = {int(p["unit_steps"]) for p in parts}
  if len(units) != 1:
    raise ValueError(f"cannot merge results with different schedule units {sorted(units)}")
  merged = {k: v for k, v in parts[0].items() if k not in ("arms", "wall_s", "command")}
  merged["arms"] = {}
  for p in parts:
    for arm, r in p["arms"].items():
      if arm in merged["arms"]:
        raise ValueError(f"arm {arm!r} is in more than one of the merged results")
      merged["arms"][arm] = r
  merged["merged_from"] = [p.get("workdir") for p in parts]
  return merged


# --------------------------------------------------------------------------------------------
# Running the arms.
# --------------------------------------------------------------------------------------------
def decay_steps(total_steps: int, unit_steps: int) -> tuple[int, int]:
  """The paper's rule: x0.1 at the last 60k and the last 20k of any schedule (1x = 90k)."""
  return (
    max(0, total_steps - int(round(unit_steps * 60 / 90))),
    max(0, total_steps - int(round(unit_steps * 20 / 90))),
  )


def multiples_of(config: ml_collections.ConfigDict) -> list[float]:
  """config.compare.multiples: the schedules both arms are evaluated at, ascending."""
  cc = config.compare
  if "multiples" not in cc:
    raise ValueError(
      "config.compare.multiples is missing: both arms now run to the longest of ONE list of "
      "schedule multiples (finetune_multiples / scratch_multiples were replaced by it)"
    )
  multiples = sorted(float(m) for m in cc.multiples)
  if not multiples or multiples[0] <= 0:
    raise ValueError(f"config.compare.multiples must be positive numbers, got {cc.multiples}")
  return [int(m) if m.is_integer() else m for m in multiples]


def seeds_of(config: ml_collections.ConfigDict) -> list[int]:
  """The detector seeds of the replicas: config.seed, config.seed + 1, ... (compare.seeds)."""
  n = int(config.compare.get("seeds", 1))
  if n < 1:
    raise ValueError(f"config.compare.seeds must be >= 1, got {n}")
  return [int(config.seed) + i for i in range(n)]


def _eval_every(every: int, steps: Sequence[int]) -> int:
  """The largest period <= `every` (0 = none) that divides every step in `steps`."""
  period = int(every or 0)
  for s in steps:
    if period <= 0 or s % period:
      period = math.gcd(period, s)
  return period


def arm_config(
  config: ml_collections.ConfigDict,
  arm: str,
  init_from: str | None = None,
  seed: int | None = None,
) -> ml_collections.ConfigDict:
  """The trainer config of one arm: schedule, evaluations, init_from, seed, training subset.

  Args:
    config: the compare config (the trainer's config plus a `compare` section).
    arm: "finetune" or "scratch".
    init_from: backbone checkpoint dir for the fine-tune arm.
    seed: the replica's detector seed (default config.seed).
  Returns:
    a copy of config with the arm's settings (config.compare is removed): trained to the longest
    multiple, evaluated at every multiple, on compare.train_images images (0 = all) chosen by
    derived_seed(config.seed, "subset").
  """
  c = copy.deepcopy(config)
  cc = c.compare
  unit = int(cc.unit_steps)
  steps = [int(round(m * unit)) for m in multiples_of(config)]
  total = max(steps)
  train_images = int(cc.get("train_images", 0) or 0)
  with c.unlocked():
    overrides = cc.get(f"{arm}_overrides", None)
    if overrides:
      c.update(overrides)  # recurses into nested ConfigDicts
    if arm == "scratch":
      c.require_init_from = False
    _set_schedule(c, total, decay_steps(total, unit))
    c.eval_every = _eval_every(c.get("eval_every", 0), steps)
    c.init_from = init_from or ""
    c.seed = int(config.seed if seed is None else seed)
    if train_images:
      c.data.num_train_images = train_images
      c.data.subset_seed = derived_seed(config.seed, "subset")
    del c["compare"]
  return c


def scale_unit_to_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """compare.scale_unit_to_data: 1x = the paper's 1x on the training set's own size
  (rethink_jax/data/recipe.py; COCO train2017 keeps 90k at 16 images), evaluated every half 1x.
  The size is the whole split's: compare.train_images does not shorten the unit."""
  if not config.compare.get("scale_unit_to_data", False):
    return config
  from rethink_jax.data import recipe  # pylint: disable=g-import-not-at-top

  c = copy.deepcopy(config)
  num_images = recipe.training_set_size(c.data, recipe.open_data(c.data))
  # Even, so that the evaluations every half unit fall on every multiple.
  unit = max(2, 2 * int(round(recipe.iters_1x(num_images, int(c.batch_size)) / 2)))
  with c.unlocked():
    c.compare.unit_steps = unit
    c.eval_every = unit // 2
  _log(f"{num_images} training images: 1x = {unit} iterations at batch {c.batch_size}")
  return c


def _set_schedule(c, total: int, decays: tuple[int, int]) -> None:
  """Writes the schedule into whichever fields the trainer's config uses."""
  s = c.schedule
  s.total_steps = total
  s.decay_steps = tuple(decays)


def _curve_of(workdir: str) -> list[dict]:
  """The trainer's evaluations in `workdir`, sorted by step ([] before the first one)."""
  from rethink_jax import train  # pylint: disable=g-import-not-at-top

  return sorted(train.read_curve(workdir), key=lambda p: p["step"])


def _config_dict(c) -> dict:
  """The config as plain JSON values (tuples as lists, references resolved)."""
  return json.loads(c.to_json())


def _seed_dir(parent: str, seed: int, num_seeds: int) -> str:
  """`parent` for one seed, `parent`/seed_<seed> for several (the default layout stays)."""
  return parent if num_seeds == 1 else os.path.join(parent, f"seed_{seed}")


def _pretrain_info(meta: dict, seed: int | None) -> dict:
  info = {k: meta[k] for k in ("source", "top1", "steps", "wall_s", "num_classes") if k in meta}
  return info if seed is None else dict(info, seed=seed)


def _check_seed(path: str, found: int | None, seed: int) -> None:
  """Refuses to reuse (resume) a run of `path` made with another seed than `seed`."""
  if found is not None and int(found) != int(seed):
    raise ValueError(
      f"{path} holds a run with seed {found}, not {seed}: use a fresh --workdir for another "
      "--config.seed"
    )


def pretrain_seed(config: ml_collections.ConfigDict, seed: int) -> int:
  """The pre-training seed of the replica with detector seed `seed` (see the module docstring)."""
  pinned = config.compare.get("pretrain", {}).get("seed", None)
  return int(pinned) if pinned is not None else derived_seed(seed, "pretrain")


def run_pretrain(config: ml_collections.ConfigDict, out_dir: str, seed: int) -> tuple[str, dict]:
  """The embedded pre-training (into out_dir/backbone) of the replica with detector seed `seed`,
  or the given converted backbone. Returns (backbone dir, info)."""
  given = config.compare.get("pretrained_backbone", "")
  if given:
    from rethink_jax import convert  # pylint: disable=g-import-not-at-top

    _, meta = convert.load_backbone(given)
    _log(f"fine-tune arm starts from the given backbone {given} (source: {meta.get('source')})")
    return given, {"backbone": given, "source": meta.get("source")}
  from rethink_jax import pretrain  # pylint: disable=g-import-not-at-top

  out = os.path.join(out_dir, "backbone")
  pre_seed = pretrain_seed(config, seed)
  if os.path.exists(os.path.join(out, "meta.json")):
    from rethink_jax import convert  # pylint: disable=g-import-not-at-top

    _, meta = convert.load_backbone(out)
    _check_seed(out, meta.get("seed"), pre_seed)
    _log(f"reusing the pre-trained backbone in {out} (top-1 {meta.get('top1')})")
  else:
    _log(
      f"pre-training the backbone on the classification set (the demo's 'ImageNet'), seed "
      f"{pre_seed}"
    )
    t0 = time.time()
    pc = pretrain.pretrain_config(config)
    pc.seed = pre_seed
    meta = pretrain.pretrain(pc, out_dir)
    meta = dict(meta, wall_s=time.time() - t0)
  return out, _pretrain_info(meta, pre_seed)


def run_arm(
  config: ml_collections.ConfigDict,
  arm: str,
  arm_dir: str,
  init_from: str | None = None,
  seed: int | None = None,
) -> tuple[dict, dict]:
  """Trains and evaluates one arm with one seed in `arm_dir`.

  Returns:
    (run {"seed", "curve", "train_loss", "wall_s", "workdir"}, the trainer config as JSON).
  """
  from rethink_jax import train  # pylint: disable=g-import-not-at-top

  c = arm_config(config, arm, init_from, seed)
  _check_seed(
    arm_dir, (files.read_json(os.path.join(arm_dir, "config.json")) or {}).get("seed"), c.seed
  )
  _log(
    f"arm {arm}, seed {c.seed}: {c.schedule.total_steps} iterations "
    f"({max(multiples_of(config)):g}x of {config.compare.unit_steps}), LR decays at "
    f"{tuple(c.schedule.decay_steps)}, evaluation every {c.eval_every}, "
    f"init_from={c.init_from or 'random'}; workdir {arm_dir}"
  )
  t0 = time.time()
  out = train.train_and_evaluate(c, arm_dir)
  curve = _curve_of(arm_dir)
  if not curve:
    raise RuntimeError(f"arm {arm}: the trainer wrote no {arm_dir}/eval_curve.json")
  last = curve[-1]
  _log(
    f"arm {arm}, seed {c.seed} done in {(time.time() - t0) / 60:.1f} min: step {last['step']} "
    + " ".join(f"{k.replace('/', ' ')} {_fmt(last[k])}" for k in METRICS if k in last)
  )
  # The logged losses (of this call: a resumed run has only its own), to compare seeds.
  losses = [
    {k: v for k, v in h.items() if k == "step" or k.startswith("loss") or k == "total_loss"}
    for h in out.get("history", [])
  ]
  run = {
    "seed": int(c.seed),
    "curve": curve,
    "train_loss": losses,
    "wall_s": time.time() - t0,
    "workdir": arm_dir,
  }
  return run, _config_dict(c)


def _arm_entry(config: ml_collections.ConfigDict, arm_dir: str, runs: list, cfg) -> dict:
  """An arm's results entry from its per-seed runs."""
  entry = {
    "config": cfg,
    "multiples": multiples_of(config),
    "unit_steps": int(config.compare.unit_steps),
    "seeds": [run["seed"] for run in runs],
    "curve": mean_curve([run["curve"] for run in runs]),
    "runs": runs,
    "wall_s": sum(run["wall_s"] or 0.0 for run in runs),
    "workdir": arm_dir,
  }
  if runs[0].get("pretrain"):
    entry["pretrain"] = runs[0]["pretrain"]
  return entry


def _new_results(config: ml_collections.ConfigDict, workdir: str, command: str | None) -> dict:
  """The results dict before any arm has reported."""
  train_images = int(config.compare.get("train_images", 0) or 0)
  results = {
    "unit_steps": int(config.compare.unit_steps),
    "workdir": workdir,
    "command": command,
    "arms": {},
    "batch_size": config.get("batch_size", None),
    "seed": int(config.seed),
    "seeds": seeds_of(config),
    "train_images": train_images,
  }
  if train_images:
    results["subset_seed"] = derived_seed(config.seed, "subset")
  return results


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  arms: Iterable[str] = ARMS,
  command: str | None = None,
) -> dict:
  """Runs the requested arms (fine-tune first: it includes pre-training) for every seed,
  writing the report after each run so partial results are readable while the next one runs."""
  t0 = time.time()
  config = scale_unit_to_data(config)
  seeds = seeds_of(config)
  results = _new_results(config, workdir, command)
  for arm in [a for a in ARMS if a in arms]:
    runs = []
    for seed in seeds:
      arm_dir = _seed_dir(os.path.join(workdir, arm), seed, len(seeds))
      if arm == "finetune":
        t_pre = time.time()
        pre_dir = _seed_dir(os.path.join(workdir, "pretrain"), seed, len(seeds))
        backbone, info = run_pretrain(config, pre_dir, seed)
        info.setdefault("wall_s", time.time() - t_pre)
        run_, cfg = run_arm(config, arm, arm_dir, init_from=backbone, seed=seed)
        run_["pretrain"] = info
      else:
        run_, cfg = run_arm(config, arm, arm_dir, seed=seed)
      runs.append(run_)
      results["arms"][arm] = _arm_entry(config, os.path.join(workdir, arm), runs, cfg)
      results["wall_s"] = time.time() - t0
      write_report(results, workdir)
  _log(
    f"comparison done in {(time.time() - t0) / 60:.1f} min; report: "
    f"{os.path.join(workdir, 'results.md')}, {os.path.join(workdir, 'curves.png')}"
  )
  print(results_markdown(results), flush=True)
  return results


def report_progress(
  config: ml_collections.ConfigDict, workdir: str, command: str | None = None
) -> dict:
  """Rebuilds the report from the arms' eval_curve.json files in `workdir` as they are now:
  readable while the arms are still training (or after a run was stopped)."""
  config = scale_unit_to_data(config)
  seeds = seeds_of(config)
  results = dict(_new_results(config, workdir, command), partial=True)
  for arm in ARMS:
    runs = []
    for seed in seeds:
      arm_dir = _seed_dir(os.path.join(workdir, arm), seed, len(seeds))
      curve = _curve_of(arm_dir)
      if not curve:
        continue
      run_ = {"seed": seed, "curve": curve, "wall_s": curve[-1].get("wall_s"), "workdir": arm_dir}
      pre_dir = _seed_dir(os.path.join(workdir, "pretrain"), seed, len(seeds))
      meta = files.read_json(os.path.join(pre_dir, "backbone", "meta.json"))
      if arm == "finetune" and meta is not None:
        run_["pretrain"] = _pretrain_info(meta, pretrain_seed(config, seed))
      runs.append(run_)
    if runs:
      cfg = _config_dict(arm_config(config, arm, seed=runs[0]["seed"]))
      results["arms"][arm] = _arm_entry(config, os.path.join(workdir, arm), runs, cfg)
  write_report(results, workdir)
  return results


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  from rethink_jax import runtime  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  del argv
  runtime.configure()
  if FLAGS.merge:
    parts = []
    for d in FLAGS.merge:
      p = load_results(d)
      p.setdefault("workdir", d)
      parts.append(p)
    merged = merge_results(parts)
    merged["command"] = " ".join(["python -m rethink_jax.compare", *sys.argv[1:]])
    write_report(merged, FLAGS.workdir)
    _log(f"merged {len(parts)} results into {FLAGS.workdir}")
    print(results_markdown(merged), flush=True)
    return
  if FLAGS.config is None:
    raise flags.ValidationError("--config is required unless --merge is given")
  if FLAGS.report_only:
    res = report_progress(
      FLAGS.config,
      FLAGS.workdir,
      command=" ".join(["python -m rethink_jax.compare", *sys.argv[1:]]),
    )
    print(results_markdown(res), flush=True)
    return
  arms = ARMS if FLAGS.arm == "both" else (FLAGS.arm,)
  run(
    FLAGS.config,
    FLAGS.workdir,
    arms,
    command=" ".join(["python -m rethink_jax.compare", *sys.argv[1:]]),
  )


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
    "config", None, "compare config file (configs/compare_*.py)", lock_config=False
  )
  flags.DEFINE_string("workdir", None, "output directory", required=True)
  flags.DEFINE_enum("arm", "both", ["both", *ARMS], "which arm(s) to run")
  flags.DEFINE_bool(
    "report_only",
    False,
    "only rebuild the report from the evaluations the "
    "arms in --workdir have written so far (while they run, or after a stop)",
  )
  flags.DEFINE_multi_string(
    "merge",
    None,
    "merge results.json of these dirs (give twice or space-separated after --merge) into --workdir",
  )


def _split_merge_args(argv: list[str]) -> list[str]:
  """Accepts `--merge DIR DIR` (two positional values) by rewriting it to absl's form."""
  out, i = [], 0
  while i < len(argv):
    if argv[i] == "--merge":
      i += 1
      while i < len(argv) and not argv[i].startswith("-"):
        out.append(f"--merge={argv[i]}")
        i += 1
      continue
    out.append(argv[i])
    i += 1
  return out


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main, argv=_split_merge_args(sys.argv))
