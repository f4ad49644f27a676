r"""The paper's comparison: random initialization vs pre-training + fine-tuning.

Runs the two arms of "Rethinking ImageNet Pre-training" on the same data and the same evaluation:

- fine-tune arm: a backbone pre-trained on a classification set (on the embedded default,
  pre-trained in this run on `shapes_classification` by rethink_jax/pretrain.py; on COCO,
  converted ImageNet weights given as `config.compare.pretrained_backbone`), then the detector
  trained with the short schedules (`config.compare.finetune_multiples`);
- scratch arm: the same detector from random initialization with the longer schedules
  (`config.compare.scratch_multiples`).

Both arms are evaluated every `config.eval_every` steps on the same validation split, so each yields
an AP-versus-iteration curve. A "schedule multiple" is `config.compare.unit_steps` iterations (the
paper's 1x = 90k iterations at batch 16; the embedded demo defines a much smaller unit). Each arm
runs ONE training to its longest multiple; the LR decays of the paper's rule (x0.1 at the last 2/3
and the last 2/9 of a unit) sit at the end of that run, and the AP "at kx" is read off the curve at
step k * unit_steps.

Usage:
  python -m rethink_jax.compare --config configs/compare_shapes.py --workdir runs/compare
  python -m rethink_jax.compare --config configs/compare_shapes.py --workdir runs/a --arm scratch
  python -m rethink_jax.compare --config configs/compare_shapes.py --workdir runs/b --arm finetune
  python -m rethink_jax.compare --workdir runs/merged --merge runs/a runs/b

Outputs in --workdir:
  results.json  {"arms": {arm: {"config", "multiples", "unit_steps", "curve": [{step, images_seen,
                bbox/AP, segm/AP, wall_s}, ...], "wall_s", ...}}, "unit_steps", ...}
  results.md    tables like the paper's Tables 1 and 2 and the final gap between the arms
  curves.png    AP versus iterations of both arms with the schedule multiples marked (Figure 1)
  predictions.png  six validation images: ground truth | each arm at 1x and at its longest
                multiple (rethink_jax/visualize.py; from the arms' eval_images/ records)
  pretrain/, finetune/, scratch/   the runs' own workdirs (checkpoints, TensorBoard events).
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

from rethink_jax import files
from rethink_jax import visualize

ARMS = ("finetune", "scratch")
METRICS = ("bbox/AP", "segm/AP")
_LABELS = {"finetune": "pre-trained + fine-tuned", "scratch": "random init"}
_COLORS = {"finetune": "tab:blue", "scratch": "tab:red"}


def _log(msg: str) -> None:
  print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def first_step_reaching(curve: Sequence[dict], key: str, threshold: float) -> dict | None:
  """The first evaluation point whose `key` is >= threshold, or None."""
  for point in sorted(curve, key=lambda p: p["step"]):
    if point.get(key) is not None and float(point[key]) >= threshold:
      return point
  return None


def _fmt(x: float | None) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


# --------------------------------------------------------------------------------------------
# Report: results.md.
# --------------------------------------------------------------------------------------------
def results_markdown(results: dict) -> str:
  """The report of `results` (the results.json dict) as markdown.

  Table 1 analogue: AP of each arm at each schedule multiple (read off its curve); Table 2
  analogue: each arm's best AP and when; the final gap (scratch minus fine-tune at each arm's
  longest schedule, as the paper compares them).
  """
  arms = {a: r for a, r in results["arms"].items() if r.get("curve")}
  unit = int(results["unit_steps"])
  all_multiples = sorted({m for r in arms.values() for m in r["multiples"]})
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

  for key in METRICS:
    lines += [f"## {key} at each schedule (Table 1)", ""]
    lines.append("| arm | " + " | ".join(f"{m:g}x" for m in all_multiples) + " |")
    lines.append("| --- |" + " --- |" * len(all_multiples))
    for arm, r in arms.items():
      cells = []
      last = max(p["step"] for p in r["curve"])
      for m in all_multiples:
        step = int(round(m * unit))
        if m > max(r["multiples"]):
          cells.append("")
        else:
          cells.append(_fmt(ap_at(r["curve"], step, key)) if step <= last else "–")
      lines.append(f"| {_LABELS.get(arm, arm)} | " + " | ".join(cells) + " |")
    lines.append("")

  lines += ["## Best of each arm (Table 2)", ""]
  extra = [
    k
    for k in ("bbox/AP50", "bbox/AP75", "segm/AP50", "segm/AP75")
    if any(k in p for r in arms.values() for p in r["curve"])
  ]
  keys = [
    "bbox/AP",
    *[k for k in extra if k.startswith("bbox")],
    "segm/AP",
    *[k for k in extra if k.startswith("segm")],
  ]
  lines.append("| arm | " + " | ".join(keys) + " | at iteration | images seen | wall (min) |")
  lines.append("| --- |" + " --- |" * (len(keys) + 3))
  for arm, r in arms.items():
    best = max(r["curve"], key=lambda p: (p.get("segm/AP") or 0.0, p["step"]))
    lines.append(
      f"| {_LABELS.get(arm, arm)} | "
      + " | ".join(_fmt(best.get(k)) for k in keys)
      + f" | {best['step']} | {best.get('images_seen', '–')} | "
      + f"{best.get('wall_s', float('nan')) / 60:.1f} |"
    )
  lines.append("")

  if all(a in arms for a in ARMS):
    lines += ["## Final gap", ""]
    ft, sc = arms["finetune"], arms["scratch"]
    ft_end = int(round(max(ft["multiples"]) * unit))
    sc_end = int(round(max(sc["multiples"]) * unit))
    ft_last = max(p["step"] for p in ft["curve"])
    sc_last = max(p["step"] for p in sc["curve"])
    for key in METRICS:
      if ft_last < ft_end or sc_last < sc_end:
        lines.append(
          f"- {key}: not available yet (fine-tune arm evaluated up to iteration "
          f"{ft_last} of {ft_end}, scratch arm up to {sc_last} of {sc_end})"
        )
        continue
      a, b = ap_at(ft["curve"], ft_end, key), ap_at(sc["curve"], sc_end, key)
      gap = None if a is None or b is None else b - a
      lines.append(
        f"- {key}: random init at {max(sc['multiples']):g}x = {_fmt(b)}, "
        f"pre-trained at {max(ft['multiples']):g}x = {_fmt(a)}, "
        f"gap (scratch - pre-trained) = {'–' if gap is None else f'{gap:+.1f}'}"
      )
    ft_1 = int(round(min(ft["multiples"]) * unit))
    for key in METRICS:
      a = ap_at(ft["curve"], ft_1, key)
      if a is None or ft_last < ft_1:
        continue
      hit = first_step_reaching(sc["curve"], key, a)
      where = (
        f"at iteration {hit['step']} ({hit['step'] / unit:.2f}x)"
        if hit
        else "not within its schedule"
      )
      lines.append(
        f"- random init reaches the pre-trained arm's {min(ft['multiples']):g}x "
        f"{key} ({_fmt(a)}) {where}"
      )
    lines.append("")

  pre = arms.get("finetune", {}).get("pretrain")
  if pre:
    lines += ["## Pre-training", ""]
    lines.append(
      ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in pre.items())
    )
    lines.append("")
  for arm, r in arms.items():
    if r.get("wall_s") is not None:
      lines.append(
        f"- {arm}: {len(r['curve'])} evaluations, training + evaluation wall time "
        f"{r['wall_s'] / 60:.1f} min"
      )
  lines.append("")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Report: curves.png.
# --------------------------------------------------------------------------------------------
def plot_curves(results: dict, path: str) -> None:
  """Writes AP versus iterations of every arm (one panel per metric) to `path` (PNG).

  Vertical dotted lines mark the schedule multiples (1x, 2x, ...), as in the paper's Figure 1.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  arms = {a: r for a, r in results["arms"].items() if r.get("curve")}
  unit = int(results["unit_steps"])
  max_mult = max([m for r in arms.values() for m in r["multiples"]] or [1])
  fig, axes = plt.subplots(1, len(METRICS), figsize=(5.2 * len(METRICS), 3.8), squeeze=False)
  for ax, key in zip(axes[0], METRICS):
    for arm, r in arms.items():
      pts = sorted((p for p in r["curve"] if p.get(key) is not None), key=lambda p: p["step"])
      ax.plot(
        [p["step"] for p in pts],
        [p[key] for p in pts],
        marker="o",
        markersize=3,
        color=_COLORS.get(arm),
        label=_LABELS.get(arm, arm),
      )
    for m in range(1, int(math.ceil(max_mult)) + 1):
      ax.axvline(m * unit, color="gray", linestyle=":", linewidth=0.8)
      ax.text(
        m * unit,
        1.0,
        f"{m}x",
        transform=ax.get_xaxis_transform(),
        ha="center",
        va="bottom",
        fontsize=8,
        color="gray",
      )
    ax.set_xlabel("iterations")
    ax.set_ylabel(key.replace("/", " ") + " (%)")
    ax.set_xlim(0, max_mult * unit * 1.02)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
  fig.suptitle("random init vs pre-trained + fine-tuned", y=1.04)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def write_report(results: dict, workdir: str) -> None:
  """Writes results.json, results.md, curves.png and predictions.png of `results` into
  `workdir`."""
  files.write_json(os.path.join(workdir, "results.json"), results, indent=1)
  files.atomic_write(os.path.join(workdir, "results.md"), results_markdown(results))
  if any(r.get("curve") for r in results["arms"].values()):
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


def arm_config(
  config: ml_collections.ConfigDict, arm: str, init_from: str | None = None
) -> ml_collections.ConfigDict:
  """The trainer config of one arm: schedule length, LR decays, init_from, eval_every.

  Args:
    config: the compare config (the trainer's config plus a `compare` section).
    arm: "finetune" or "scratch".
    init_from: backbone checkpoint dir for the fine-tune arm.
  Returns:
    a copy of config with the arm's settings (config.compare is removed).
  """
  c = copy.deepcopy(config)
  cc = c.compare
  multiples = list(cc[f"{arm}_multiples"])
  total = int(round(max(multiples) * cc.unit_steps))
  with c.unlocked():
    overrides = cc.get(f"{arm}_overrides", None)
    if overrides:
      c.update(overrides)  # recurses into nested ConfigDicts
    if arm == "scratch":
      c.require_init_from = False
    _set_schedule(c, total, decay_steps(total, cc.unit_steps))
    c.init_from = init_from or ""
    del c["compare"]
  return c


def scale_unit_to_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """compare.scale_unit_to_data: 1x = the paper's 1x on the training set's own size
  (rethink_jax/data/recipe.py; COCO train2017 keeps 90k at 16 images), evaluated every half 1x."""
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


def run_pretrain(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, dict]:
  """The embedded pre-training arm (or the given converted backbone). Returns (dir, info)."""
  given = config.compare.get("pretrained_backbone", "")
  if given:
    from rethink_jax import convert  # pylint: disable=g-import-not-at-top

    _, meta = convert.load_backbone(given)
    _log(f"fine-tune arm starts from the given backbone {given} (source: {meta.get('source')})")
    return given, {"backbone": given, "source": meta.get("source")}
  from rethink_jax import pretrain  # pylint: disable=g-import-not-at-top

  out = os.path.join(workdir, "pretrain", "backbone")
  if os.path.exists(os.path.join(out, "meta.json")):
    from rethink_jax import convert  # pylint: disable=g-import-not-at-top

    _, meta = convert.load_backbone(out)
    _log(f"reusing the pre-trained backbone in {out} (top-1 {meta.get('top1')})")
  else:
    _log("pre-training the backbone on the classification set (the demo's 'ImageNet')")
    t0 = time.time()
    meta = pretrain.pretrain(pretrain.pretrain_config(config), os.path.join(workdir, "pretrain"))
    meta = dict(meta, wall_s=time.time() - t0)
  info = {k: meta[k] for k in ("source", "top1", "steps", "wall_s", "num_classes") if k in meta}
  return out, info


def run_arm(
  config: ml_collections.ConfigDict, arm: str, workdir: str, init_from: str | None = None
) -> dict:
  """Trains and evaluates one arm; returns its results entry."""
  from rethink_jax import train  # pylint: disable=g-import-not-at-top

  c = arm_config(config, arm, init_from)
  arm_dir = os.path.join(workdir, arm)
  multiples = list(config.compare[f"{arm}_multiples"])
  _log(
    f"arm {arm}: {c.schedule.total_steps} iterations ({max(multiples):g}x of "
    f"{config.compare.unit_steps}), LR decays at {tuple(c.schedule.decay_steps)}, "
    f"evaluation every {c.eval_every}, init_from={c.init_from or 'random'}; workdir {arm_dir}"
  )
  t0 = time.time()
  train.train_and_evaluate(c, arm_dir)
  curve = _curve_of(arm_dir)
  if not curve:
    raise RuntimeError(f"arm {arm}: the trainer wrote no {arm_dir}/eval_curve.json")
  last = curve[-1]
  _log(
    f"arm {arm} done in {(time.time() - t0) / 60:.1f} min: step {last['step']} bbox AP "
    f"{_fmt(last.get('bbox/AP'))} segm AP {_fmt(last.get('segm/AP'))}"
  )
  return {
    "config": _config_dict(c),
    "multiples": multiples,
    "unit_steps": int(config.compare.unit_steps),
    "curve": curve,
    "wall_s": time.time() - t0,
    "workdir": arm_dir,
  }


def _new_results(config: ml_collections.ConfigDict, workdir: str, command: str | None) -> dict:
  """The results dict before any arm has reported."""
  return {
    "unit_steps": int(config.compare.unit_steps),
    "workdir": workdir,
    "command": command,
    "arms": {},
    "batch_size": config.get("batch_size", None),
  }


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  arms: Iterable[str] = ARMS,
  command: str | None = None,
) -> dict:
  """Runs the requested arms (fine-tune first: it includes pre-training), writing the report
  after each arm so partial results are readable while the next arm runs."""
  t0 = time.time()
  config = scale_unit_to_data(config)
  results = _new_results(config, workdir, command)
  for arm in [a for a in ARMS if a in arms]:
    if arm == "finetune":
      t_pre = time.time()
      backbone, info = run_pretrain(config, workdir)
      info.setdefault("wall_s", time.time() - t_pre)
      r = run_arm(config, arm, workdir, init_from=backbone)
      r["pretrain"] = info
    else:
      r = run_arm(config, arm, workdir)
    results["arms"][arm] = r
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
  results = dict(_new_results(config, workdir, command), partial=True)
  for arm in ARMS:
    arm_dir = os.path.join(workdir, arm)
    curve = _curve_of(arm_dir)
    if not curve:
      continue
    c = arm_config(config, arm)
    r = {
      "config": _config_dict(c),
      "multiples": list(config.compare[f"{arm}_multiples"]),
      "unit_steps": int(config.compare.unit_steps),
      "curve": curve,
      "workdir": arm_dir,
      "wall_s": curve[-1].get("wall_s"),
    }
    meta = files.read_json(os.path.join(workdir, "pretrain", "backbone", "meta.json"))
    if arm == "finetune" and meta is not None:
      r["pretrain"] = {
        k: meta[k] for k in ("source", "top1", "steps", "wall_s", "num_classes") if k in meta
      }
    results["arms"][arm] = r
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
