r"""Classifies videos with a trained model: the top-k classes and their probabilities.

    python -m msca_jax.predict --config=configs/msca_kv.py:demo --checkpoint=/tmp/msca_kv_demo \
        --video=clip.mp4 [--top_k=5] [--views=test|val] [--labels=labels.txt]

Many videos: --video=FOLDER (its video files, recursively) or --video=LIST.txt (one path per line)
runs them all in one process, --batch_size videos per model call (default config.eval.batch_size),
into one CSV (--output, default predictions.csv: path, status, label_i, prob_i); a video that
cannot be read is reported on stderr, marked in the status column and skipped, and the exit
status is 0 unless none could be read. A long video: --window_seconds=W [--hop_seconds=H] decodes
it as a stream and classifies each W-second window (each sampled as a whole video would be) into
a CSV (start_s, end_s, status, label_i, prob_i) and a timeline plot beside it (.png).

The video goes through what evaluation does with a prepared video (msca_jax/inference.py):
  1. decoding as the training data was prepared: PyAV, resampled to its fps, resized to its short
     side and stored as JPEGs at its quality, as the checkpoint recorded them (else as the
     dataset of --config recorded them, else the preparation tools' defaults); --short_side /
     --jpeg_quality override;
  2. the evaluation views: config.data.eval_clips x eval_crops ('test', the default) or
     val_clips x val_crops ('val'), sampled and cropped by the pipeline's own functions;
  3. the model on every view, logits averaged over views (`evaluate.average_views`), softmax.

--checkpoint is a training workdir (its latest checkpoint), its checkpoints/ or one step of it, or
a params directory (`pretrained.save_params`, `tools.convert_torch`). Class names are the ones the
checkpoint was trained with (else those of --config's dataset); --labels (a file with one name per
line, or a directory holding labels.txt) replaces them, and without any the classes are shown by
index. A mistake in the inputs is one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app, flags

from msca_jax import cli, inference
from msca_jax.data.errors import DataError


def write_top_k_csv(path: str, first_columns: Sequence[str], rows, top_k: int) -> None:
  """A CSV of `first_columns` then label_1, prob_1, ... label_k, prob_k; rows are (values, top)."""
  import csv
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(list(first_columns) + [f"{kind}_{r}" for r in range(1, top_k + 1)
                                           for kind in ("label", "prob")])
    for values, top in rows:
      cells = [x for _, name, prob in top for x in (name, f"{prob:.6f}")]
      writer.writerow(list(values) + cells + [""] * (2 * top_k - len(cells)))


def plot_timeline(path: str, rows, names: Sequence[str], title: str = "",
                  max_classes: int = 8) -> None:
  """Probability against time of the classes that are the most probable in some window."""
  from msca_jax.train import evaluate

  good = [r for r in rows if r[2] == "ok"]
  fig = evaluate.new_figure(8.0, 3.5)
  ax = fig.add_subplot()
  if good:
    probabilities = np.stack([r[4] for r in good])
    centres = [(r[0] + r[1]) / 2 for r in good]
    winners = np.argmax(probabilities, axis=1)
    shown = sorted(set(winners.tolist()), key=lambda c: -probabilities[:, c].max())[:max_classes]
    for c in shown:
      ax.plot(centres, probabilities[:, c], marker="o", markersize=3, label=names[c])
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
  ax.set_xlabel("time (s, window centre)")
  ax.set_ylabel("probability")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title)
  evaluate.save_figure(fig, path)



def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 argv: Sequence[str] | None = None) -> flags.FlagValues:
  """Defines the flags; only when run as a program, so importing this module defines nothing.

  `argv` is where --config.FIELD overrides are looked for (default: sys.argv).
  """
  inference.define_model_flags(flag_values, argv)
  inference.define_video_flags(flag_values)
  flags.DEFINE_integer("batch_size", None, "Videos (or windows) per model call when there are many "
                       "(default: config.eval.batch_size).", flag_values=flag_values)
  flags.DEFINE_string("output", None, "CSV to write for a folder or list of videos (default "
                      "predictions.csv) or for --window_seconds (default windows.csv, and its "
                      "timeline plot beside it as .png).", flag_values=flag_values)
  flags.DEFINE_float("window_seconds", None, "Classify windows of this many seconds of one long "
                     "video.", flag_values=flag_values)
  flags.DEFINE_float("hop_seconds", None, "Seconds between window starts (default: "
                     "--window_seconds, no overlap).", flag_values=flag_values)
  return flag_values


def _check_required(flag_values: flags.FlagValues) -> None:
  if flag_values.config is None or not flag_values.checkpoint or not flag_values.video:
    raise app.UsageError("--config, --checkpoint and --video are required, e.g. "
                         "--config=configs/msca_kv.py:demo --checkpoint=WORKDIR --video=clip.mp4")


def run(flag_values: flags.FlagValues, out=None) -> int:
  """The command: prints the prediction to `out` (stdout); a mistake in the inputs is one line on
  stderr and cli.EXIT_USER_ERROR."""
  _check_required(flag_values)
  from msca_jax.data import video

  fv, out = flag_values, out or sys.stdout
  if fv.top_k < 1:
    raise app.UsageError(f"--top_k must be at least 1, got {fv.top_k}")
  if fv.batch_size is not None and fv.batch_size < 1:
    raise app.UsageError(f"--batch_size must be at least 1, got {fv.batch_size}")
  windows = fv.window_seconds is not None
  if fv.hop_seconds is not None and not windows:
    raise app.UsageError("--hop_seconds needs --window_seconds")
  hop = fv.hop_seconds if fv.hop_seconds is not None else fv.window_seconds
  if windows and (fv.window_seconds <= 0 or hop <= 0):
    raise app.UsageError(f"--window_seconds and --hop_seconds must be positive, got "
                         f"{fv.window_seconds:g} and {hop:g}")
  try:
    many = inference.is_video_list(fv.video)
    if windows and many:
      raise inference.InferenceError(f"--video {fv.video}: --window_seconds takes one video file, "
                                     "not a folder or a list")
    if not many and not os.path.isfile(fv.video):
      raise inference.InferenceError(f"--video {fv.video}: no such file")
    paths = inference.list_videos(fv.video) if many else [fv.video]
    protocol = inference.describe_protocol(fv.config.data, fv.views)
    model = inference.load_model(fv.config, fv.checkpoint, labels=fv.labels,
                                 short_side=fv.short_side, jpeg_quality=fv.jpeg_quality)
    if many:
      _run_many(model, paths, fv, protocol, out)
    elif windows:
      _run_windows(model, fv.video, fv.window_seconds, hop, fv, protocol, out)
    else:
      _run_one(model, fv.video, fv, protocol, out)
  except video.VideoError as e:
    return _fail(f"--video: {e}")
  except (inference.InferenceError, DataError) as e:
    return _fail(e)
  return 0


def _fail(message) -> int:
  print(f"predict: error: {cli.one_line(message)}", file=sys.stderr)
  return cli.EXIT_USER_ERROR


def _run_one(model, path, fv, protocol, out) -> None:
  decode, names = model.decode, model.names
  result = inference.classify(model.config, model.params, path, fv.views, fv.top_k, names, decode)
  seconds = result.num_frames_decoded / decode.fps if decode.fps else float("nan")
  print(f"video      {path}: {result.num_frames_decoded} frames ({seconds:.2f} s), decoded at "
        f"{decode.describe()}", file=out)
  print(f"views      {protocol} ({fv.views} protocol)", file=out)
  print(f"weights    {model.report.source}: {len(model.report.loaded)} arrays", file=out)
  if model.warning:
    print(f"warning    {model.warning}", file=out)
  if model.report.resized:
    print(f"warning    resized to the config's frame size: {', '.join(model.report.resized)}",
          file=out)
  print(f"classes    {len(names)}, {model.names_origin}", file=out)
  print(f"top-{len(result.top)}", file=out)
  width = max(len(name) for _, name, _ in result.top)
  for rank, (index, name, prob) in enumerate(result.top, 1):
    print(f"  {rank}. {name:<{width}}  {prob:.4f}  (class {index})", file=out)


def _run_many(model, paths, fv, protocol, out) -> None:
  """Every video of a folder or list into one CSV; bad ones are listed and skipped."""
  output = fv.output or "predictions.csv"
  rows = inference.classify_many(model.config, model.params, paths, fv.views, fv.top_k,
                                 model.names, model.decode, fv.batch_size)
  write_top_k_csv(output, ("path", "status"), [((p, s), top) for p, s, top in rows],
                  min(fv.top_k, len(model.names)))
  bad = [(p, s) for p, s, _ in rows if s != "ok"]
  for p, s in bad:
    print(f"predict: skipped {p}: {s.removeprefix(p + ': ')}", file=sys.stderr)
  print(f"videos     {len(rows) - len(bad)} of {len(rows)} classified, {len(bad)} skipped; "
        f"decoded at {model.decode.describe()}", file=out)
  print(f"views      {protocol} ({fv.views} protocol)", file=out)
  print(f"wrote      {output}", file=out)
  if len(bad) == len(rows):
    raise inference.InferenceError(f"--video {fv.video}: none of the {len(rows)} videos could be "
                                   f"read (first: {bad[0][0]}: {bad[0][1]})")


def _run_windows(model, path, window_seconds, hop_seconds, fv, protocol, out) -> None:
  """Sliding windows over one video: a CSV of per-window top-k and a timeline plot."""
  output = fv.output or "windows.csv"
  plot = os.path.splitext(output)[0] + ".png"
  rows = inference.classify_windows(model.config, model.params, path, window_seconds, hop_seconds,
                                    fv.views, fv.top_k, model.names, model.decode, fv.batch_size)
  write_top_k_csv(output, ("start_s", "end_s", "status"),
                  [((f"{a:.3f}", f"{b:.3f}", s), top) for a, b, s, top, _ in rows],
                  min(fv.top_k, len(model.names)))
  plot_timeline(plot, rows, model.names, title=os.path.basename(path))
  print(f"video      {path}: {len(rows)} windows of {window_seconds:g} s every {hop_seconds:g} s, "
        f"decoded at {model.decode.describe()}", file=out)
  print(f"views      {protocol} per window", file=out)
  for start, end, status, top, _ in rows:
    best = f"{top[0][1]} {top[0][2]:.4f}" if top else status
    print(f"  {start:8.2f}-{end:8.2f} s  {best}", file=out)
  print(f"wrote      {output}, {plot}", file=out)


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _check_required(flags.FLAGS)
  inference.start_program(flags.FLAGS)
  return run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
