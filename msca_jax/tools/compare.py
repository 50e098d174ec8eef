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
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping, Sequence

import numpy as np
from absl import app, flags, logging

from configs import label, load as load_variant
from msca_jax import host_memory

METRICS = ("top1", "top5", "pair_accuracy", "within_pair_accuracy")
CHANCE = {"within_pair_accuracy": 0.5}


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
  flags.mark_flag_as_required("workdir", flag_values=flag_values)


def main(argv):
  logging.info("%s", host_memory.keep_freed_memory())  # before JAX starts its threads
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from msca_jax import progress
  progress.quiet_library_logs()
  fv = flags.FLAGS
  os.makedirs(fv.workdir, exist_ok=True)
  results = compare(fv.workdir, fv.variants, fv.num_epochs, fv.seed)
  print(format_table(results), flush=True)
  print(f"plots: {os.path.join(fv.workdir, 'comparison.png')}, "
        f"{os.path.join(fv.workdir, 'comparison_curves.png')}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
