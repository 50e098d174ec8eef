r"""The mean over UCF101's / HMDB51's three official splits, as papers report it.

    python -m msca_jax.tools.split_mean /runs/ucf_split1 /runs/ucf_split2 /runs/ucf_split3

Each argument is a workdir evaluated with `python -m msca_jax.main --mode=evaluate` (or trained
with train_and_evaluate); its latest test report (WORKDIR/eval/test_step*/SPLIT_metrics.json,
`evaluate.write_reports`) is read. Prints each split's top-1, top-5 and mean class accuracy and
their mean over the workdirs, and for each the step it was trained to, or, for a workdir that
evaluated config.init's weights, their source and its step. Each workdir must be evaluated on a different split. Exit status 2
names a workdir without a report or two workdirs with the same split.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import sys
from typing import Sequence

from msca_jax.errors import UserError

METRICS = ("top1", "top5", "mean_class_accuracy")


@dataclasses.dataclass(frozen=True)
class SplitReport:
  workdir: str
  path: str
  split: str
  step: int | None
  num_videos: int
  metrics: dict[str, float | None]
  # Where the weights came from when not from the workdir's own training (config.init), and the
  # step is theirs (None: not a training checkpoint of ours).
  weights: str | None = None

  def describe(self) -> str:
    if self.weights is None:
      return f"step {self.step}"
    return f"weights {self.weights}" + (f", step {self.step}" if self.step is not None else "")


def latest_report(workdir: str) -> SplitReport:
  """The workdir's test report of the highest step; UserError when there is none."""
  found = []
  for path in glob.glob(os.path.join(glob.escape(workdir), "eval", "test_step*", "*_metrics.json")):
    match = re.search(r"test_step(\d+)$", os.path.dirname(path))
    if match:
      found.append((int(match[1]), path))
  if not found:
    raise UserError(f"{workdir}: no test report (eval/test_step*/SPLIT_metrics.json); evaluate "
                    "it first with python -m msca_jax.main --mode=evaluate")
  step, path = max(found)
  try:
    with open(path) as f:
      report = json.load(f)
    metrics = report["metrics"]
    split = report["split"]
    num_videos = int(report["num_videos"])
    protocol = report.get("protocol") or {}
    weights = protocol.get("weights")
    if weights is not None:
      step = protocol.get("step")
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{path}: not a readable evaluation report ({e})") from e
  # Top-5 is top-C with fewer than 5 classes (evaluate.EvalResult.metrics names it so).
  top_k = next((k for k in metrics if re.fullmatch(r"top\d+", k) and k != "top1"), None)
  metrics = {"top1": metrics.get("top1"), "top5": metrics.get(top_k) if top_k else None,
             "mean_class_accuracy": metrics.get("mean_class_accuracy")}
  return SplitReport(workdir, path, split, step, num_videos, metrics, weights)


def split_mean(workdirs: Sequence[str]) -> tuple[list[SplitReport], dict[str, float | None]]:
  """(each workdir's report, the mean of each metric); a metric missing anywhere has mean None."""
  if len(workdirs) < 2:
    raise UserError(f"expected the workdirs of several splits (usually 3), got {len(workdirs)}")
  reports = [latest_report(w) for w in workdirs]
  seen: dict[str, str] = {}
  for r in reports:
    if r.split in seen:
      raise UserError(f"{seen[r.split]} and {r.workdir} were both evaluated on split {r.split!r}: "
                      "expected one workdir per split")
    seen[r.split] = r.workdir
  mean = {}
  for name in METRICS:
    values = [r.metrics.get(name) for r in reports]
    mean[name] = None if any(v is None for v in values) else sum(values) / len(values)
  return reports, mean


def _pct(value: float | None) -> str:
  return "   n/a" if value is None else f"{100 * value:6.2f}"


def format_table(reports: Sequence[SplitReport], mean: dict[str, float | None]) -> str:
  lines = [f"{'split':<12} {'videos':>7} {'top-1':>6} {'top-5':>6} {'mean class':>10}  workdir"]
  for r in reports:
    lines.append(f"{r.split:<12} {r.num_videos:>7} {_pct(r.metrics.get('top1'))} "
                 f"{_pct(r.metrics.get('top5'))} {_pct(r.metrics.get('mean_class_accuracy')):>10}"
                 f"  {r.workdir} ({r.describe()})")
  lines.append(f"{'mean':<12} {'':>7} {_pct(mean['top1'])} {_pct(mean['top5'])} "
               f"{_pct(mean['mean_class_accuracy']):>10}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  if len(argv) < 2 or any(a.startswith("-") for a in argv[1:]):
    print("usage: python -m msca_jax.tools.split_mean WORKDIR1 WORKDIR2 WORKDIR3", file=sys.stderr)
    return 2
  try:
    reports, mean = split_mean(argv[1:])
  except UserError as e:
    print(f"split_mean: error: {e}", file=sys.stderr)
    return 2
  print(format_table(reports, mean))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
