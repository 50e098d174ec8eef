r"""Trains demo variants side by side on the synthetic dataset and compares their accuracy.

    python -m msca_jax.tools.compare --workdir=/tmp/msca_compare
    python -m msca_jax.tools.compare --workdir=/tmp/msca_compare --variants=vit,msca_kv,msca_q \
        --num_epochs=5

Every variant gets its `:demo` config (same small transformer, same data, same optimiser, same
number of steps) and trains in WORKDIR/<variant>; a variant already trained there is only
re-evaluated from its checkpoint. The synthetic classes come in time-reversed pairs (move
left/right, rotate clockwise/anticlockwise, grow/shrink, ...), so a model that looks at frames
one by one can find the pair but not the class within it: its within-pair accuracy stays at
chance (50 %), while a temporal model's should not.

Writes WORKDIR/comparison.json, WORKDIR/comparison.png (bars) and WORKDIR/comparison_curves.png
(validation top-1 during training), and prints a table. The helpers only this tool needs live
here: `read_metrics` (a workdir's metrics.jsonl) and the two accuracy plots.

The variant study (--study) trains every entry of STUDY (ViT, TokenShift, the 7 MSCA head and 7
patch variants, and MSCA-KV with 2+2 shifted heads beside the demo's 1+1) for every --seeds, each
run in WORKDIR/<entry>/seed_<seed>, so a rerun reads finished runs and resumes an interrupted one:

    python -m msca_jax.tools.compare --study --workdir=/tmp/msca_study [--seeds=0,1,2] \
        [--steps=200 | --num_epochs=3] [--variants=vit,msca_kv,msca_kv_heads2]

and writes the mean and standard deviation per entry: WORKDIR/study.{md,csv,json,png}.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping, Sequence

import numpy as np
from absl import app, flags, logging

from msca_jax.configs import get as load_variant, label
from msca_jax import host_memory

METRICS = ("top1", "top5", "pair_accuracy", "within_pair_accuracy")
# Accuracy by guessing on the synthetic dataset: 8 classes, in 4 time-reversed pairs.
CHANCE = {"top1": 0.125, "within_pair_accuracy": 0.5}


def demo_config(variant: str, num_epochs: int | None, seed: int):
  try:
    config = load_variant(variant, "demo")
  except ValueError as e:
    raise app.UsageError(f"--variants: {e}") from e
  if num_epochs is not None:
    config.train.num_epochs = num_epochs
  config.train.seed = seed
  config.eval.every_epochs = 1  # a validation point per epoch for the curves (a second each)
  return config


def read_metrics(workdir: str) -> list[dict]:
  """A training workdir's metrics.jsonl as one dict per step, in step order.

  A resumed run logs again the steps between its last checkpoint and the interruption; the
  later line of a step wins, so the rows are those of the run that continued.
  """
  import tensorflow as tf  # gfile: a gs:// workdir reads like a local one

  rows: dict[int, dict] = {}
  with tf.io.gfile.GFile(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
  return [rows[step] for step in sorted(rows)]


def compare(workdir: str, variants: list[str], num_epochs: int | None = None, seed: int = 0) -> dict:
  """Trains (or re-evaluates) each variant; returns {variant: {metric: value, 'seconds', ...}}."""
  import jax

  from msca_jax import models
  from msca_jax.train import trainer

  results = {}
  for variant in variants:
    config = demo_config(variant, num_epochs, seed)
    run_dir = os.path.join(workdir, variant)
    logging.info("=== %s: training in %s", variant, run_dir)
    start = time.monotonic()
    out = trainer.run(config, run_dir, "train_and_evaluate")
    test = {k.split("/", 1)[1]: v for k, v in out["test"].items()}
    curve = [(row["step"], row["val/top1"]) for row in read_metrics(run_dir) if "val/top1" in row]
    curve.append((out["step"], test["top1"]))  # the end of training, with the test views
    _, _, variables = models.abstract_variables(config.model)
    results[variant] = {
        **{m: test[m] for m in METRICS if m in test},
        "steps": out["step"], "seconds": time.monotonic() - start,
        "params": sum(x.size for x in jax.tree.leaves(variables)),
        "curve": curve,
    }

  with open(os.path.join(workdir, "comparison.json"), "w") as f:
    json.dump(results, f, indent=2)
  plot_accuracy_bars(
      os.path.join(workdir, "comparison.png"),
      {label(v): {m: r[m] for m in METRICS if m in r} for v, r in results.items()},
      title="synthetic time-reversed pairs, demo models", chance=CHANCE)
  plot_accuracy_curves(
      os.path.join(workdir, "comparison_curves.png"),
      {label(v): r["curve"] for v, r in results.items()}, title="validation during training")
  return results


# ---------------------------------------------------------------------------------------------
# The variant study: every variant, several seeds, each run its own workdir.

MSCA_TARGETS = ("q", "k", "v", "qk", "qv", "kv", "qkv")
# name -> (variant file, config.model overrides). The demo's MSCA variants shift one of its 4
# heads each way (shift_div 4, '1+1'); 'msca_kv_heads2' shifts two each way (shift_div 2).
STUDY = {
    "vit": ("vit", {}), "tokenshift": ("tokenshift", {}),
    **{f"msca_{t}": (f"msca_{t}", {}) for t in MSCA_TARGETS},
    **{f"msca_{t}_patch": (f"msca_{t}_patch", {}) for t in MSCA_TARGETS},
    "msca_kv_heads2": ("msca_kv", {"shift_div": 2}),
}
STUDY_LABELS = {"msca_kv": "MSCA-KV (1+1)", "msca_kv_heads2": "MSCA-KV (2+2)"}
STUDY_METRICS = ("top1", "top5", "within_pair_accuracy")
STUDY_PLOT_NAMES = {"top1": "top-1", "within_pair_accuracy": "right class within its pair"}


def study_label(name: str) -> str:
  return STUDY_LABELS.get(name, label(STUDY[name][0] if name in STUDY else name))


def study_config(name: str, seed: int, num_epochs: int | None = None, steps: int | None = None):
  """The demo config of a study entry (a STUDY name, or any variant file) for one seed."""
  variant, overrides = STUDY.get(name, (name, {}))
  config = demo_config(variant, num_epochs, seed)
  config.model.update(overrides)
  if steps is not None:
    config.train.num_steps = steps
  config.eval.every_epochs = 0  # only the final test evaluation: the study compares end points
  return config


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def study(workdir: str, names: Sequence[str], seeds: Sequence[int], num_epochs: int | None = None,
          steps: int | None = None, progress_stream=None) -> dict[str, list[dict]]:
  """Trains every (name, seed) in WORKDIR/<name>/seed_<seed>; returns {name: [result per seed]}.

  A run that finished before (its result.json holds the same config) is read, not run again; an
  interrupted one resumes from its last checkpoint (the trainer does). A result.json of another
  config is a user error: the run directory would mix two experiments.
  """
  from msca_jax import progress
  from msca_jax.errors import UserError
  from msca_jax.train import trainer

  results: dict[str, list[dict]] = {}
  with progress.Progress(total=len(names) * len(seeds), unit="runs", desc="study",
                         stream=progress_stream) as bar:
    reused = 0
    for name in names:
      for seed in seeds:
        config = study_config(name, seed, num_epochs, steps)
        run_dir = os.path.join(workdir, name, f"seed_{seed}")
        result_path = os.path.join(run_dir, "result.json")
        wanted = _config_json(config)
        if os.path.exists(result_path):
          with open(result_path) as f:
            result = json.load(f)
          if result.get("config") != wanted:
            raise UserError(f"{run_dir} holds a finished run of another config (e.g. another "
                            "--steps or --num_epochs): use another --workdir or remove it")
          reused += 1
        else:
          bar.write(f"study: {name} seed {seed}: training in {run_dir}")
          start = time.monotonic()
          out = trainer.run(config, run_dir, "train_and_evaluate")
          test = {k.split("/", 1)[1]: v for k, v in out["test"].items()}
          result = {"name": name, "seed": seed, "steps": out["step"],
                    "seconds": time.monotonic() - start,
                    **{m: test[m] for m in METRICS if m in test}, "config": wanted}
          with open(result_path + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
          os.replace(result_path + ".tmp", result_path)
        results.setdefault(name, []).append(result)
        bar.update(1, reused=reused)
  return results


def summarize(results: Mapping[str, Sequence[Mapping]], metrics: Sequence[str] = STUDY_METRICS
              ) -> dict[str, dict]:
  """{name: {'seeds': n, metric: mean, metric + '_std': sample std (ddof 1; NaN for one seed)}}."""
  summary = {}
  for name, runs in results.items():
    row: dict = {"seeds": len(runs)}
    for m in metrics:
      values = np.array([r[m] for r in runs if m in r], np.float64)
      row[m] = float(values.mean()) if values.size else math.nan
      row[f"{m}_std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
    row["steps"] = sorted({int(r["steps"]) for r in runs})
    summary[name] = row
  return summary


def format_study(summary: Mapping[str, Mapping], markdown: bool = False) -> str:
  """A table of mean ± std (in %) per entry; `markdown` for a docs page."""
  columns = ("model", "seeds", "steps", "top-1 (%)", "top-5 (%)", "within pair (%)")

  def cell(row, m):
    std = row[f"{m}_std"]
    return f"{100 * row[m]:.1f} ± {100 * std:.1f}" if not math.isnan(std) else f"{100 * row[m]:.1f}"
  rows = [(study_label(n), str(r["seeds"]), "/".join(map(str, r["steps"])),
           *(cell(r, m) for m in STUDY_METRICS)) for n, r in summary.items()]
  if markdown:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
  else:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.append("")
  lines.append("mean ± sample standard deviation over seeds; within pair: of the videos put in the "
               "right time-reversed pair, the fraction given the right class of the two (chance 50 %)")
  return "\n".join(lines)


def write_study(workdir: str, results: Mapping[str, Sequence[Mapping]]) -> dict[str, str]:
  """study.json, study.csv, study.md and study.png in WORKDIR; returns their paths by kind."""
  import csv
  summary = summarize(results)
  paths = {kind: os.path.join(workdir, f"study.{kind}") for kind in ("json", "csv", "md", "png")}
  with open(paths["json"], "w") as f:
    json.dump({"summary": summary, "runs": {n: [{k: v for k, v in r.items() if k != "config"}
                                                for r in runs] for n, runs in results.items()}},
              f, indent=2)
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["name", "label", "seeds"] + [x for m in STUDY_METRICS for x in (m, f"{m}_std")])
    for name, row in summary.items():
      writer.writerow([name, study_label(name), row["seeds"]] +
                      [f"{row[x]:.6f}" for m in STUDY_METRICS for x in (m, f"{m}_std")])
  with open(paths["md"], "w") as f:
    f.write(format_study(summary, markdown=True) + "\n")
  plot_study(paths["png"], summary, results)
  return paths


def plot_study(path: str, summary: Mapping[str, Mapping],
               runs: Mapping[str, Sequence[Mapping]] | None = None,
               metrics: Sequence[str] = ("top1", "within_pair_accuracy")) -> None:
  """One bar per entry and metric: the mean over seeds, the standard deviation as error bar, and
  each seed's value as a dot (with three seeds the spread says more than the bar)."""
  from msca_jax.train import evaluate
  names = list(summary)
  fig = evaluate.new_figure(max(6.0, 0.45 * len(names) * len(metrics) + 1.5), 4.5)
  ax = fig.add_subplot()
  x = np.arange(len(names))
  width = 0.8 / len(metrics)
  for i, m in enumerate(metrics):
    means = [100 * summary[n][m] for n in names]
    stds = [0.0 if math.isnan(summary[n][f"{m}_std"]) else 100 * summary[n][f"{m}_std"]
            for n in names]
    centres = x - 0.4 + width * (i + 0.5)
    bars = ax.bar(centres, means, width * 0.95, yerr=stds, capsize=2, label=STUDY_PLOT_NAMES.get(m, m))
    if runs:
      for centre, name in zip(centres, names):
        values = [100 * r[m] for r in runs.get(name, ()) if m in r]
        ax.scatter(np.full(len(values), centre), values, s=9, color="black", zorder=3,
                   label="one seed" if i == 0 and name == names[0] else None)
    if m in CHANCE:
      ax.axhline(100 * CHANCE[m], color=bars.patches[0].get_facecolor(), linestyle="dashed",
                 linewidth=0.8, label=f"chance, {STUDY_PLOT_NAMES.get(m, m)}")
  ax.set_xticks(x, labels=[study_label(n) for n in names], rotation=60, ha="right", fontsize=8)
  ax.set_ylabel("accuracy (%), mean ± std over seeds")
  ax.set_ylim(0, 105)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
  ax.set_title("variant study: synthetic time-reversed pairs, demo models")
  evaluate.save_figure(fig, path)


def plot_accuracy_bars(path: str, values: Mapping[str, Mapping[str, float]], title: str = "",
                       chance: Mapping[str, float] | None = None) -> None:
  """Grouped bars, one group per metric, one bar per run: e.g. {'ViT': {'top1': 0.6, ...}, ...}.

  Values are fractions, drawn as percent. `chance` ({metric: value}) draws a dashed line over
  that metric's group, e.g. {'within_pair_accuracy': 0.5} on the synthetic dataset.
  """
  from msca_jax.train import evaluate
  names = list(values)
  metrics = list(dict.fromkeys(m for run in values.values() for m in run))
  width = 0.8 / max(len(names), 1)
  fig = evaluate.new_figure(max(5.0, 1.2 + 0.9 * len(metrics) * max(len(names), 1) * 0.6), 4.0)
  ax = fig.add_subplot()
  x = np.arange(len(metrics))
  for i, name in enumerate(names):
    heights = [100 * values[name].get(m, math.nan) for m in metrics]
    bars = ax.bar(x - 0.4 + width * (i + 0.5), heights, width * 0.95, label=name)
    ax.bar_label(bars, labels=["" if math.isnan(h) else f"{h:.1f}" for h in heights],
                 fontsize=8, padding=2)
  for j, metric in enumerate(metrics):
    if chance and metric in chance:
      ax.hlines(100 * chance[metric], j - 0.45, j + 0.45, colors="grey", linestyles="dashed")
      ax.text(j + 0.45, 100 * chance[metric], "chance", ha="right", va="bottom", fontsize=7,
              color="grey")
  ax.set_xticks(x, labels=[m.replace("_", " ") for m in metrics])
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 105)
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # never over a bar
  ax.grid(axis="y", alpha=0.3)
  if title:
    ax.set_title(title)
  evaluate.save_figure(fig, path)


def plot_accuracy_curves(path: str, runs: Mapping[str, Sequence[tuple[int, float]]],
                         title: str = "", metric: str = "top-1") -> None:
  """Accuracy against training step, one line per run: {'MSCA': [(step, accuracy), ...], ...}."""
  from msca_jax.train import evaluate
  fig = evaluate.new_figure(6.0, 4.0)
  ax = fig.add_subplot()
  for name, points in runs.items():
    points = sorted(points)
    if points:
      steps, accuracies = zip(*points)
      ax.plot(steps, [100 * a for a in accuracies], marker="o", markersize=3, label=name)
  ax.set_xlabel("step")
  ax.set_ylabel(f"{metric} accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
  if title:
    ax.set_title(title)
  evaluate.save_figure(fig, path)


def format_table(results: dict) -> str:
  header = f"{'model':<12} {'steps':>6} {'top-1':>7} {'top-5':>7} {'pair':>7} {'within pair':>12} {'time':>7}"
  lines = [header, "-" * len(header)]
  for variant, r in results.items():
    lines.append(f"{label(variant):<12} {r['steps']:>6} {100 * r['top1']:>6.1f}% {100 * r['top5']:>6.1f}% "
                 f"{100 * r.get('pair_accuracy', float('nan')):>6.1f}% "
                 f"{100 * r.get('within_pair_accuracy', float('nan')):>11.1f}% {r['seconds']:>6.0f}s")
  lines.append("within pair: of the videos put in the right pair, the fraction given the right "
               "class of the two (chance 50 %)")
  return "\n".join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("workdir", None, "Directory for the runs and the comparison.",
                      flag_values=flag_values)
  flags.DEFINE_list("variants", ["vit", "tokenshift", "msca_kv"],
                    "Config names under configs/, each trained with its :demo argument.",
                    flag_values=flag_values)
  flags.DEFINE_integer("num_epochs", None, "Epochs for every variant (default: the demo's).",
                       flag_values=flag_values)
  flags.DEFINE_integer("seed", 0, "config.train.seed for every variant.", flag_values=flag_values)
  flags.DEFINE_bool("study", False, "The variant study: every entry of STUDY (or --variants) for "
                    "every --seeds, mean and std per entry.", flag_values=flag_values)
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the study.", flag_values=flag_values)
  flags.DEFINE_integer("steps", None, "Train steps of every study run (config.train.num_steps; "
                       "default: the demo's epochs).", flag_values=flag_values)
  flags.mark_flag_as_required("workdir", flag_values=flag_values)


def main(argv):
  logging.info("%s", host_memory.keep_freed_memory())  # before JAX starts its threads
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from msca_jax import progress
  progress.quiet_library_logs()
  fv = flags.FLAGS
  os.makedirs(fv.workdir, exist_ok=True)
  if fv.study:
    return _main_study(fv)
  results = compare(fv.workdir, fv.variants, fv.num_epochs, fv.seed)
  print(format_table(results), flush=True)
  print(f"plots: {os.path.join(fv.workdir, 'comparison.png')}, "
        f"{os.path.join(fv.workdir, 'comparison_curves.png')}")


def _main_study(fv) -> None:
  names = fv.variants if fv["variants"].present else list(STUDY)
  try:
    seeds = [int(s) for s in fv.seeds]
  except ValueError:
    raise app.UsageError(f"--seeds: expected integers, got {','.join(fv.seeds)}") from None
  if not seeds:
    raise app.UsageError("--seeds: expected at least one seed")
  if fv.steps is not None and fv.steps < 1:
    raise app.UsageError(f"--steps must be at least 1, got {fv.steps}")
  for name in names:  # every name before the first run: a typo should not wait for hours
    study_config(name, seeds[0], fv.num_epochs, fv.steps)
  results = study(fv.workdir, names, seeds, fv.num_epochs, fv.steps)
  paths = write_study(fv.workdir, results)
  print(format_study(summarize(results)), flush=True)
  print(f"wrote: {', '.join(paths.values())}")


if __name__ == "__main__":
  define_flags()
  from msca_jax import cli
  cli.run(main)
