"""Evaluation metrics and reports (docs/recipe.md): every video counted exactly once.

The trainer runs the model on each evaluation batch (views folded into the batch; the model
averages its logits over frames), averages over views with `average_views`, and hands numpy arrays
to an `EvalAccumulator`. Padding rows and skipped records (mask 0) are ignored, whatever their
logits hold; skipped records are counted by reason. At the end:

    accumulator = EvalAccumulator(source.num_classes, source.class_names)
    for batch in pipeline.as_numpy(ds):
      logits = average_views(predict(batch["video"]))            # (B, C)
      accumulator.add(logits, batch["label"], batch["mask"], batch["key"], batch["error"])
    result = accumulator.result()
    write_reports(workdir, "validation", result, accumulator, protocol={"num_clips": 10, ...})
    print(format_summary_table(result, protocol, title="validation"))

Accuracies are fractions in [0, 1] (NaN when undefined, e.g. no videos); tables show percent.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from msca_jax.data.pipeline import SKIP_REASONS

TOP_K = 5
# Above this many classes a confusion-matrix picture is unreadable, and the table lists no classes.
MAX_PLOTTED_CLASSES = 50


def average_views(view_logits, num_views: int | None = None):
  """(B, V, C) -> (B, C): the mean over views (the logits are already averaged over frames).

  With `num_views`, also takes the model's folded output (B * V, C), views of a video adjacent.
  Works on numpy and JAX arrays alike, inside `jax.jit` too; the mean is taken in at least
  float32, so bfloat16 logits do not lose precision summing 30 views.
  """
  if num_views is not None and view_logits.ndim == 2:
    view_logits = view_logits.reshape(-1, num_views, view_logits.shape[-1])
  if view_logits.ndim != 3:
    raise ValueError(f"average_views expects (B, V, C) logits, got shape {view_logits.shape}")
  dtype = np.promote_types(view_logits.dtype, np.float32)
  return view_logits.astype(dtype).mean(axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
  """Class probabilities on the host (numpy), for reports and predictions."""
  shifted = logits - logits.max(axis=-1, keepdims=True)
  e = np.exp(shifted)
  return e / e.sum(axis=-1, keepdims=True)


def _key_text(key: Any) -> str:
  if isinstance(key, (bytes, np.bytes_)):
    return bytes(key).decode("utf-8", errors="replace")
  return str(key)


def _nan_to_none(value: float) -> float | None:
  return None if value is None or math.isnan(value) else float(value)


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Per-video predictions, in the order the videos were added."""
  keys: tuple[str, ...]
  labels: np.ndarray          # (N,) int
  top_classes: np.ndarray     # (N, k) int, best first; -1 for videos with non-finite logits
  top_probs: np.ndarray       # (N, k) softmax probabilities of top_classes (NaN when non-finite)

  def __len__(self) -> int:
    return len(self.keys)


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Metrics of one evaluation pass. Accuracies are fractions, NaN with nothing to count."""
  num_videos: int
  top1: float
  top5: float                 # top-k with k = min(5, num_classes)
  mean_class_accuracy: float  # mean of per-class top-1 recall over classes present in the labels
  per_class_accuracy: np.ndarray  # (C,) float, NaN for classes with no videos
  per_class_count: np.ndarray     # (C,) int, videos per true class
  confusion: np.ndarray           # (C, C) int, rows true class, columns top-1 prediction
  skipped: dict[str, int]         # records skipped by reason (mask 0, error != 0)
  class_names: tuple[str, ...]
  top_k: int = TOP_K
  num_nonfinite: int = 0      # videos with NaN / inf logits: counted wrong, not in `confusion`
  num_unkeyed: int = 0        # videos with an empty key: not checked for duplicates

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def metrics(self) -> dict[str, float | None]:
    """The headline numbers, JSON-ready (None for NaN)."""
    return {"top1": _nan_to_none(self.top1), f"top{self.top_k}": _nan_to_none(self.top5),
            "mean_class_accuracy": _nan_to_none(self.mean_class_accuracy)}

  def to_dict(self) -> dict[str, Any]:
    """Everything, JSON-ready."""
    return {
        "num_videos": self.num_videos,
        "metrics": self.metrics(),
        "skipped": dict(self.skipped),
        "num_skipped": self.num_skipped,
        "num_nonfinite": self.num_nonfinite,
        "num_unkeyed": self.num_unkeyed,
        "num_classes": self.num_classes,
        "per_class": [
            {"class": i, "name": name, "count": int(self.per_class_count[i]),
             "accuracy": _nan_to_none(float(self.per_class_accuracy[i]))}
            for i, name in enumerate(self.class_names)],
        "confusion": self.confusion.tolist(),
    }


class EvalAccumulator:
  """Accumulates masked evaluation batches; every video must arrive exactly once.

  Rows with mask 0 (padding and skipped records) are ignored, except that skipped records
  (error != 0) are counted by reason. A key seen twice raises ValueError: the protocol evaluates
  each video exactly once, so a repeat means a broken input stream (e.g. a repeated dataset or
  overlapping host shards). Videos with an empty key cannot be checked and are counted instead.
  """

  def __init__(self, num_classes: int, class_names: Sequence[str] | None = None):
    if num_classes < 1:
      raise ValueError(f"num_classes must be positive, got {num_classes}")
    if class_names is None:
      class_names = [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
      raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    self.num_classes = num_classes
    self.class_names = tuple(str(n) for n in class_names)
    self.top_k = min(TOP_K, num_classes)
    self._confusion = np.zeros((num_classes, num_classes), np.int64)
    self._per_class_count = np.zeros(num_classes, np.int64)
    self._top1_correct = 0
    self._topk_correct = 0
    self._nonfinite = 0
    self._unkeyed = 0
    self._skipped = np.zeros(len(SKIP_REASONS), np.int64)
    self._seen: set[str] = set()
    self._keys: list[str] = []
    self._labels: list[np.ndarray] = []
    self._top_classes: list[np.ndarray] = []
    self._top_probs: list[np.ndarray] = []

  @property
  def num_videos(self) -> int:
    return len(self._keys)

  def add(self, logits, labels, mask, keys: Iterable[Any], errors=None) -> None:
    """Adds one batch: logits (B, C), labels (B,), mask (B,) 0/1, keys (B,) bytes/str, errors (B,).

    The batch is checked whole before anything is recorded, so a rejected batch leaves the
    accumulator unchanged.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    mask = np.asarray(mask).reshape(-1)
    keys = list(keys)
    batch = labels.shape[0]
    if logits.ndim != 2 or logits.shape != (batch, self.num_classes):
      raise ValueError(f"logits of shape {logits.shape}, expected ({batch}, {self.num_classes})"
                       " (average over views first)")
    if mask.shape[0] != batch or len(keys) != batch:
      raise ValueError(f"batch sizes differ: labels {batch}, mask {mask.shape[0]}, "
                       f"keys {len(keys)}")
    valid = mask.astype(bool)

    skipped = np.zeros_like(self._skipped)
    if errors is not None:
      errors = np.asarray(errors).reshape(-1).astype(np.int64)
      if errors.shape[0] != batch:
        raise ValueError(f"errors has {errors.shape[0]} rows, batch has {batch}")
      if np.any(errors[valid] != 0):
        raise ValueError("rows with mask 1 carry a skip error code; mask must be (error == 0)")
      codes = errors[~valid]
      codes = codes[codes != 0]
      if codes.size and (codes.min() < 1 or codes.max() > len(SKIP_REASONS)):
        raise ValueError(f"unknown error codes {sorted(set(codes.tolist()))}; "
                         f"known: 1..{len(SKIP_REASONS)} = {SKIP_REASONS}")
      skipped = np.bincount(codes - 1, minlength=len(SKIP_REASONS)).astype(np.int64)

    labels = labels[valid].astype(np.int64)
    outside = (labels < 0) | (labels >= self.num_classes)
    if outside.any():
      raise ValueError(f"labels outside [0, {self.num_classes}): "
                       f"{sorted(set(labels[outside].tolist()))}")
    new_keys = [_key_text(k) for k, v in zip(keys, valid) if v]
    batch_seen: set[str] = set()
    for key in new_keys:
      if not key:
        continue
      if key in self._seen or key in batch_seen:
        raise ValueError(f"video {key!r} evaluated twice: the protocol counts each video exactly "
                         "once (is the evaluation dataset repeated, or do hosts share shards?)")
      batch_seen.add(key)

    # Padding and skipped rows may hold anything (garbage, NaN): drop them before any arithmetic.
    logits = logits[valid].astype(np.float64)
    finite = np.all(np.isfinite(logits), axis=1)
    order = np.argsort(-np.where(finite[:, None], logits, 0.0), axis=1, kind="stable")
    top_classes = order[:, :self.top_k]
    probs = softmax(np.where(finite[:, None], logits, 0.0))
    top_probs = np.take_along_axis(probs, top_classes, axis=1)
    # A non-finite output is no prediction: it counts as wrong and stays out of the confusion.
    top_classes = np.where(finite[:, None], top_classes, -1)
    top_probs = np.where(finite[:, None], top_probs, np.nan)

    self._skipped += skipped
    self._seen.update(batch_seen)
    self._unkeyed += sum(1 for k in new_keys if not k)
    self._nonfinite += int(np.sum(~finite))
    self._per_class_count += np.bincount(labels, minlength=self.num_classes)
    np.add.at(self._confusion, (labels[finite], top_classes[finite, 0]), 1)
    self._top1_correct += int(np.sum(top_classes[:, 0] == labels))
    self._topk_correct += int(np.sum(np.any(top_classes == labels[:, None], axis=1)))
    self._keys.extend(new_keys)
    self._labels.append(labels)
    self._top_classes.append(top_classes)
    self._top_probs.append(top_probs)

  def predictions(self) -> Predictions:
    """The per-video predictions so far, in the order added."""
    k = self.top_k
    return Predictions(
        keys=tuple(self._keys),
        labels=np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64),
        top_classes=(np.concatenate(self._top_classes) if self._top_classes
                     else np.zeros((0, k), np.int64)),
        top_probs=(np.concatenate(self._top_probs) if self._top_probs
                   else np.zeros((0, k), np.float64)))

  def result(self) -> EvalResult:
    """The metrics so far (the accumulator can go on taking batches)."""
    n = self.num_videos
    counts = self._per_class_count.copy()
    correct = np.diag(self._confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
      per_class = np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)
    present = counts > 0
    return EvalResult(
        num_videos=n,
        top1=self._top1_correct / n if n else math.nan,
        top5=self._topk_correct / n if n else math.nan,
        mean_class_accuracy=float(np.mean(per_class[present])) if present.any() else math.nan,
        per_class_accuracy=per_class,
        per_class_count=counts,
        confusion=self._confusion.copy(),
        skipped={reason: int(c) for reason, c in zip(SKIP_REASONS, self._skipped)},
        class_names=self.class_names,
        top_k=self.top_k,
        num_nonfinite=self._nonfinite,
        num_unkeyed=self._unkeyed)


def pair_accuracy(confusion) -> dict[str, float]:
  """For classes in pairs (2k, 2k + 1): how often the pair is right, and the class given the pair.

  `pair_accuracy` is the fraction of videos predicted in their true pair; `within_pair_accuracy`
  the fraction of those predicted as the exact class. On the synthetic dataset (time-reversed
  pairs) a frame-wise model should sit near 0.5 within pairs, a temporal model near 1.
  """
  confusion = np.asarray(confusion)
  c = confusion.shape[0]
  if confusion.shape != (c, c) or c % 2:
    raise ValueError(f"pair_accuracy needs a square confusion matrix with an even number of "
                     f"classes, got shape {confusion.shape}")
  total = confusion.sum()
  pair = np.arange(c) // 2
  in_pair = confusion[pair[:, None] == pair[None, :]].sum()
  correct = np.trace(confusion)
  return {"pair_accuracy": float(in_pair / total) if total else math.nan,
          "within_pair_accuracy": float(correct / in_pair) if in_pair else math.nan}


# ---------------------------------------------------------------------------------------------
# Reports


def _write_bytes(path: str, data: bytes) -> None:
  # gfile, so that a gs:// work directory works like a local one.
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(data)


def save_figure(fig, path: str) -> None:
  """Writes a matplotlib figure as PNG (gfile: local or gs:// paths)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
  _write_bytes(path, buffer.getvalue())


def new_figure(width: float, height: float):
  """A matplotlib Figure of this size (inches), for save_figure."""
  # A bare Figure renders with Agg without pyplot: no global backend state, no display needed.
  from matplotlib.figure import Figure
  return Figure(figsize=(width, height))


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def _json_safe(value: Any) -> Any:
  """NaN and inf become None: strict JSON readers reject them."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def _dumps_report(report: Mapping[str, Any]) -> str:
  """Indented JSON, but lists of rows (per-class entries, confusion rows) one row a line.

  Plain indentation would put each of Kinetics-400's 160,000 confusion counts on its own line.
  """
  dumps = lambda v, **kw: json.dumps(v, default=_json_default, allow_nan=False, **kw)
  entries = []
  for name, value in report.items():
    if isinstance(value, list) and value and all(isinstance(v, (list, dict)) for v in value):
      text = "[\n" + ",\n".join("    " + dumps(v) for v in value) + "\n  ]"
    else:
      text = dumps(value, indent=2).replace("\n", "\n  ")
    entries.append(f"  {json.dumps(str(name))}: {text}")
  return "{\n" + ",\n".join(entries) + "\n}"


def predictions_csv(result: EvalResult, predictions: Predictions) -> str:
  """The per-video predictions as CSV text, one row per video."""
  names = result.class_names
  k = result.top_k
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  header = ["key", "label", "label_name"]
  for i in range(1, k + 1):
    header += [f"top{i}_class", f"top{i}_name", f"top{i}_prob"]
  writer.writerow(header + ["correct", f"correct_top{k}"])
  for key, label, classes, probs in zip(predictions.keys, predictions.labels,
                                        predictions.top_classes, predictions.top_probs):
    row = [key, int(label), names[label]]
    for c, p in zip(classes, probs):
      row += [int(c), names[c] if c >= 0 else "", "" if math.isnan(p) else f"{p:.6f}"]
    writer.writerow(row + [int(classes[0] == label), int(label in classes)])
  return out.getvalue()


def plot_confusion(path: str, result: EvalResult, title: str = "") -> None:
  """A PNG of the confusion matrix: colour is the row-normalised rate, text the count."""
  confusion = result.confusion
  c = result.num_classes
  rows = confusion.sum(axis=1, keepdims=True)
  rates = confusion / np.maximum(rows, 1)
  size = min(4 + 0.35 * c, 20)
  fig = new_figure(size + 1.5, size)
  ax = fig.add_subplot()
  image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
  ax.set_xticks(range(c), labels=result.class_names, rotation=45, ha="right",
                rotation_mode="anchor", fontsize=8 if c > 20 else 9)
  ax.set_yticks(range(c), labels=result.class_names, fontsize=8 if c > 20 else 9)
  ax.set_xlabel("predicted (top-1)")
  ax.set_ylabel("true class")
  if c <= 20:  # counts stay legible only for small matrices
    for i in range(c):
      for j in range(c):
        if confusion[i, j]:
          ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                  color="white" if rates[i, j] > 0.5 else "black")
  heading = f"top-1 {100 * result.top1:.2f}%, {result.num_videos} videos"
  ax.set_title(f"{title}\n{heading}" if title else heading)
  save_figure(fig, path)


def write_reports(directory: str, split: str, result: EvalResult, accumulator: EvalAccumulator,
                  protocol: Mapping[str, Any] | None = None) -> dict[str, str]:
  """Writes {split}_metrics.json, {split}_predictions.csv and {split}_confusion.png (<= 50 classes).

  `protocol` (views, clips, crops, checkpoint step, ...) is stored as given in the JSON.
  Returns {'metrics': path, 'predictions': path[, 'confusion': path]}.
  """
  tf.io.gfile.makedirs(directory)
  paths = {"metrics": os.path.join(directory, f"{split}_metrics.json"),
           "predictions": os.path.join(directory, f"{split}_predictions.csv")}
  report = {"split": split, "protocol": dict(protocol or {}), **result.to_dict()}
  _write_bytes(paths["metrics"], (_dumps_report(_json_safe(report)) + "\n").encode())
  _write_bytes(paths["predictions"],
               predictions_csv(result, accumulator.predictions()).encode("utf-8"))
  if result.num_classes <= MAX_PLOTTED_CLASSES:
    paths["confusion"] = os.path.join(directory, f"{split}_confusion.png")
    plot_confusion(paths["confusion"], result, title=split)
  return paths


def _percent(value: float) -> str:
  return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f} %"


def _views_text(protocol: Mapping[str, Any]) -> str | None:
  clips, crops = protocol.get("num_clips"), protocol.get("num_crops")
  if clips is not None and crops is not None:
    return (f"{int(clips) * int(crops)} ({clips} clip{'s' if clips != 1 else ''} x "
            f"{crops} crop{'s' if crops != 1 else ''})")
  views = protocol.get("views", protocol.get("num_views"))
  return None if views is None else str(views)


def format_summary_table(result: EvalResult, protocol: Mapping[str, Any] | None = None,
                         title: str = "") -> str:
  """A fixed-width summary for the end of an evaluation: counts, accuracies, skips, classes.

  The per-class rows appear for label sets of at most 50 classes. Protocol entries other than
  the view counts are listed as they are.
  """
  protocol = dict(protocol or {})
  label_width = 26
  rows: list[tuple[str, str]] = [("videos evaluated", f"{result.num_videos:,}")]
  views = _views_text(protocol)
  rows.append(("views per video", views if views is not None else "?"))
  for name, value in protocol.items():
    if name not in ("num_clips", "num_crops", "views", "num_views"):
      rows.append((name.replace("_", " "), str(value)))
  rows += [("top-1", _percent(result.top1)),
           (f"top-{result.top_k}", _percent(result.top5)),
           ("mean class accuracy", _percent(result.mean_class_accuracy))]
  if result.num_nonfinite:
    rows.append(("non-finite logits (wrong)", f"{result.num_nonfinite:,}"))
  if result.num_unkeyed:
    rows.append(("videos without key", f"{result.num_unkeyed:,}"))
  rows.append(("skipped records", f"{result.num_skipped:,}"))
  rows += [(f"  {reason}", f"{count:,}") for reason, count in result.skipped.items()]

  class_lines: list[str] = []
  if result.num_classes <= MAX_PLOTTED_CLASSES:
    name_width = max([len("class")] + [len(n) for n in result.class_names])
    class_lines.append(f"{'class':<{name_width}}  {'videos':>7}  {'top-1':>8}")
    for name, count, acc in zip(result.class_names, result.per_class_count,
                                result.per_class_accuracy):
      class_lines.append(f"{name:<{name_width}}  {int(count):>7,}  {_percent(float(acc)):>8}")

  # Values right-aligned in one column, so that digits and percent signs line up.
  value_width = max(len(value) for _, value in rows)
  body = [f"{label:<{label_width}}{value:>{value_width}}" for label, value in rows]
  width = max(len(line) for line in body + class_lines + [title + "    "])
  heading = f"== {title} " if title else ""
  lines = [heading + "=" * (width - len(heading))] + body
  if class_lines:
    lines += ["-" * width] + class_lines
  lines.append("=" * width)
  return "\n".join(lines)
