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
(validation top-1 during training), and prints a table.
"""

from __future__ import annotations

import importlib
import json
import os
import time

from absl import app, flags, logging

from msca_jax import host_memory

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and the comparison.",
                               required=True)
_VARIANTS = flags.DEFINE_list("variants", ["vit", "tokenshift", "msca_kv"],
                              "Config names under configs/, each trained with its :demo argument.")
_NUM_EPOCHS = flags.DEFINE_integer("num_epochs", None, "Epochs for every variant (default: the demo's).")
_SEED = flags.DEFINE_integer("seed", 0, "config.train.seed for every variant.")

LABELS = {"vit": "ViT", "tokenshift": "TokenShift"}
METRICS = ("top1", "top5", "pair_accuracy", "within_pair_accuracy")
CHANCE = {"within_pair_accuracy": 0.5}


def label(variant: str) -> str:
  """'msca_kv' -> 'MSCA-KV', 'msca_q_patch' -> 'MSCA-Q (patch)'."""
  if variant in LABELS:
    return LABELS[variant]
  name = variant.replace("msca_", "MSCA-").upper()
  return name.replace("_PATCH", " (patch)")


def demo_config(variant: str, num_epochs: int | None, seed: int):
  try:
    module = importlib.import_module(f"configs.{variant}")
  except ModuleNotFoundError as e:
    raise app.UsageError(f"--variants: no config file configs/{variant}.py") from e
  config = module.get_config("demo")
  if num_epochs is not None:
    config.train.num_epochs = num_epochs
  config.train.seed = seed
  config.eval.every_epochs = 1  # a validation point per epoch for the curves (a second each)
  return config


def compare(workdir: str, variants: list[str], num_epochs: int | None = None, seed: int = 0) -> dict:
  """Trains (or re-evaluates) each variant; returns {variant: {metric: value, 'seconds', ...}}."""
  import jax

  from msca_jax import models
  from msca_jax.train import evaluate, trainer

  results = {}
  for variant in variants:
    config = demo_config(variant, num_epochs, seed)
    run_dir = os.path.join(workdir, variant)
    logging.info("=== %s: training in %s", variant, run_dir)
    start = time.monotonic()
    out = trainer.run(config, run_dir, "train_and_evaluate")
    test = {k.split("/", 1)[1]: v for k, v in out["test"].items()}
    curve = [(row["step"], row["val/top1"]) for row in trainer.read_metrics(run_dir) if "val/top1" in row]
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
  evaluate.plot_accuracy_bars(
      os.path.join(workdir, "comparison.png"),
      {label(v): {m: r[m] for m in METRICS if m in r} for v, r in results.items()},
      title="synthetic time-reversed pairs, demo models", chance=CHANCE)
  evaluate.plot_accuracy_curves(
      os.path.join(workdir, "comparison_curves.png"),
      {label(v): r["curve"] for v, r in results.items()}, title="validation during training")
  return results


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


def main(argv):
  logging.info("%s", host_memory.keep_freed_memory())  # before JAX starts its threads
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from msca_jax import progress
  progress.quiet_library_logs()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  results = compare(_WORKDIR.value, _VARIANTS.value, _NUM_EPOCHS.value, _SEED.value)
  print(format_table(results), flush=True)
  print(f"plots: {os.path.join(_WORKDIR.value, 'comparison.png')}, "
        f"{os.path.join(_WORKDIR.value, 'comparison_curves.png')}")


if __name__ == "__main__":
  app.run(main)
