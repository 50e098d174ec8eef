r"""Writes per-video embeddings of a trained model: per frame, and the clip average.

    python -m msca_jax.tools.extract_features --config=configs/msca_kv.py:demo \
        --checkpoint=/tmp/msca_kv_demo --output_dir=/tmp/features \
        (--split=validation | --videos=FOLDER | --videos=LIST.txt) [--shard_size=256] [--views=test]

The features are the model's pre-head embeddings (`model.apply(..., return_features=True)`: the
CLS token of every frame after the final norm) on each video's evaluation views, prepared exactly
as `predict` and evaluation prepare them. For N videos in a shard, V views, T frames and width D:

    OUTPUT_DIR/shard-00000.frames.npy   float32 (N, V, T, D)  per view and frame (--per_frame)
    OUTPUT_DIR/shard-00000.clips.npy    float32 (N, D)        the mean over views and frames
    OUTPUT_DIR/shard-00000.csv          the shard's videos: key, label, status, offset
    OUTPUT_DIR/index.csv                every video: key, label, label_name, status, shard, offset
    OUTPUT_DIR/features.json            what was extracted, from what, and the skip counts
    OUTPUT_DIR/features.png             the clip features' first two principal components,
                                        one colour per class: do the classes separate?

The head is linear and the logits are averaged over frames and views, so the head applied to a
clip average gives the video's evaluation logits. A shard is written whole (its .csv last); a
rerun skips the shards already written, so a killed run loses at most the shard it was writing.
A video that cannot be read is reported, marked in the index with its reason, and skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import sys
from typing import Iterator, Sequence

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app, flags

from msca_jax import cli, inference
from msca_jax.errors import UserError

INDEX_COLUMNS = ("key", "label", "label_name", "status", "shard", "offset")


@dataclasses.dataclass
class Row:
  index: int        # position in the input
  key: str          # the dataset's video key, or the file path
  label: int        # -1 when unknown (files)
  status: str       # 'ok' or why the video was skipped


def shard_name(shard: int) -> str:
  return f"shard-{shard:05d}"


def completed_shards(output_dir: str) -> set[int]:
  """Shards whose .csv (written last) is there."""
  done = set()
  for name in os.listdir(output_dir) if os.path.isdir(output_dir) else ():
    if name.startswith("shard-") and name.endswith(".csv"):
      done.add(int(name[len("shard-"):-len(".csv")]))
  return done


class _SkipFirst:
  """A dataset source whose evaluation records start at `first` (reading, not decoding, the rest)."""

  def __init__(self, source, first: int):
    self._source, self._first = source, first

  def __getattr__(self, name):
    return getattr(self._source, name)

  def eval_records(self, *, process_index: int, process_count: int):
    return self._source.eval_records(process_index=process_index,
                                     process_count=process_count).skip(self._first)


def _split_batches(source, data, views: str, batch_size: int, first: int) -> Iterator[tuple]:
  """(rows, views) batches of a dataset split, from its video `first` on."""
  from msca_jax.data import pipeline, stream

  num_clips, num_crops = inference.view_counts(data, views)
  eval_stream = stream.EvalStream(_SkipFirst(source, first), data, batch_size=batch_size,
                                  num_clips=num_clips, num_crops=num_crops)
  for batch in eval_stream:
    rows = []
    for i, index in enumerate(batch.host["index"]):
      if index < 0:   # padding of the last batch
        break
      error = int(batch.host["error"][i])
      rows.append(Row(int(index), bytes(batch.host["key"][i]).decode("utf-8", "replace"),
                      int(batch.device["label"][i]) if not error else -1,
                      pipeline.SKIP_REASONS[error - 1] if error else "ok"))
    yield rows, batch.device["video"]


def _file_batches(paths: Sequence[str], data, views: str, batch_size: int, decode, shard_size: int,
                  first_shard: int) -> Iterator[tuple]:
  """(rows, views) batches of video files, shard by shard from `first_shard` on."""
  for start in range(first_shard * shard_size, len(paths), shard_size):
    chunk = list(enumerate(paths[start:start + shard_size], start))
    loaders = ((i, functools.partial(inference.decode_video, p, decode)) for i, p in chunk)
    for keys, statuses, batch in inference.view_batches(loaders, data, views, batch_size):
      yield [Row(i, paths[i], -1, s) for i, s in zip(keys, statuses)], batch


@functools.lru_cache(maxsize=4)
def _features_fn(model):
  import jax
  return jax.jit(functools.partial(model.apply, return_features=True))


def features(config, params, views: np.ndarray) -> np.ndarray:
  """(B, V, T, D) float32 pre-head features of (B, V, T, S, S, 3) views."""
  from msca_jax import models

  model = models.build(config.model)
  _, feats = _features_fn(model)({"params": params}, views.reshape((-1,) + views.shape[2:]))
  return np.asarray(feats, np.float32).reshape(views.shape[:2] + feats.shape[1:])


def _save_npy(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.save(f, array)
  os.replace(tmp, path)


def _write_shard(output_dir: str, shard: int, rows: list[Row], frames: list[np.ndarray],
                 per_frame: bool, width: int, shape: tuple[int, ...]) -> None:
  """The shard's arrays, then its .csv: the .csv says the shard is whole."""
  base = os.path.join(output_dir, shard_name(shard))
  stacked = np.stack(frames) if frames else np.zeros((0,) + shape, np.float32)
  if per_frame:
    _save_npy(base + ".frames.npy", stacked)
  _save_npy(base + ".clips.npy", stacked.mean(axis=(1, 2)) if frames else np.zeros((0, width),
                                                                                     np.float32))
  tmp = base + ".csv.tmp"
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(("index", "key", "label", "status", "offset"))
    offset = 0
    for row in rows:
      ok = row.status == "ok"
      writer.writerow((row.index, row.key, row.label, row.status, offset if ok else ""))
      offset += ok
  os.replace(tmp, base + ".csv")


def _read_shard_rows(output_dir: str, shard: int) -> list[dict]:
  with open(os.path.join(output_dir, shard_name(shard) + ".csv"), newline="",
            encoding="utf-8") as f:
    return list(csv.DictReader(f))


def extract(config, params, output_dir: str, *, split: str | None = None,
            paths: Sequence[str] | None = None, views: str = "test", shard_size: int = 256,
            batch_size: int | None = None, per_frame: bool = True, decode=None,
            progress_stream=None, report=None) -> dict:
  """Writes the shards and the index (see the module docstring); returns features.json's dict.

  Exactly one of `split` (a split of config.data) and `paths` (video files) is given. Shards
  already written in `output_dir` by an extraction of the same input and settings are kept.
  """
  from msca_jax import models, progress
  from msca_jax.data import sources

  if (split is None) == (paths is None):
    raise UserError("give exactly one of --split and --videos")
  if shard_size < 1:
    raise UserError(f"--shard_size must be at least 1, got {shard_size}")
  batch_size = int(batch_size or config.eval.batch_size)
  report = report or (lambda message: print(message, file=sys.stderr))
  data = config.data
  clips, crops = inference.view_counts(data, views)
  width = int(models.architecture(config.model)["width"])
  shape = (clips * crops, int(data.num_frames), width)
  if split is not None:
    source = sources.make_source(data, split)
    total, names = source.num_records, list(source.class_names)
    what = f"split {split!r} of {source.description}"
  else:
    decode = decode or inference.decode_settings(data)
    total, names = len(paths), []
    what = f"{total} video files"
  meta = {"input": what, "videos": total, "views": views, "view_shape": list(shape),
          "protocol": inference.describe_protocol(data, views), "shard_size": shard_size,
          "per_frame": per_frame, "model": config.model.to_dict()}
  meta_path = os.path.join(output_dir, "features.json")
  os.makedirs(output_dir, exist_ok=True)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      before = {k: v for k, v in json.load(f).items() if k in meta}
    if json.loads(json.dumps(meta)) != before:
      changed = sorted(k for k in meta if json.loads(json.dumps(meta[k])) != before.get(k))
      raise UserError(f"--output_dir {output_dir} holds features of another extraction (differs "
                      f"in {', '.join(changed)}): use another --output_dir or empty it")
  with open(meta_path, "w") as f:
    json.dump(meta, f, indent=2)

  num_shards = -(-total // shard_size)
  done = completed_shards(output_dir)
  first = 0
  while first in done:   # shards are written in order: resume at the first one missing
    first += 1
  if first < num_shards:
    if split is not None:
      batches = _split_batches(source, data, views, batch_size, first * shard_size)
    else:
      batches = _file_batches(paths, data, views, batch_size, decode, shard_size, first)
    shard, rows, frames = first, [], []
    with progress.Progress(total=total, unit="videos", desc="extract_features",
                           initial=min(total, first * shard_size), stream=progress_stream) as bar:
      for batch_rows, batch in batches:
        feats = features(config, params, batch)
        for i, row in enumerate(batch_rows):
          if row.index // shard_size != shard:
            _write_shard(output_dir, shard, rows, frames, per_frame, width, shape)
            shard, rows, frames = row.index // shard_size, [], []
          rows.append(row)
          if row.status == "ok":
            frames.append(feats[i])
          else:
            report(f"extract_features: skipped {row.key}: {row.status.removeprefix(row.key + ': ')}")
        bar.update(len(batch_rows))
      if rows:
        _write_shard(output_dir, shard, rows, frames, per_frame, width, shape)

  index_rows, skipped = [], {}
  for s in range(num_shards):
    for r in _read_shard_rows(output_dir, s):
      label = int(r["label"])
      index_rows.append((r["key"], label if label >= 0 else "",
                         names[label] if 0 <= label < len(names) else "", r["status"],
                         s if r["status"] == "ok" else "", r["offset"]))
      if r["status"] != "ok":   # counted by reason: the status without its path and details
        reason = r["status"].removeprefix(r["key"] + ": ").split(" (")[0]
        skipped[reason] = skipped.get(reason, 0) + 1
  with open(os.path.join(output_dir, "index.csv.tmp"), "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(INDEX_COLUMNS)
    writer.writerows(index_rows)
  os.replace(os.path.join(output_dir, "index.csv.tmp"), os.path.join(output_dir, "index.csv"))
  meta.update(extracted=len(index_rows) - sum(skipped.values()), skipped=skipped,
              shards=num_shards, resumed_at_shard=first)
  with open(meta_path, "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def load(output_dir: str, what: str = "clips") -> tuple[np.ndarray, list[dict]]:
  """All shards' `what` ('clips' or 'frames') concatenated, and the index rows of the videos kept."""
  with open(os.path.join(output_dir, "index.csv"), newline="", encoding="utf-8") as f:
    rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
  shards = sorted({int(r["shard"]) for r in rows})
  arrays = {s: np.load(os.path.join(output_dir, f"{shard_name(s)}.{what}.npy")) for s in shards}
  return (np.stack([arrays[int(r["shard"])][int(r["offset"])] for r in rows]) if rows
          else np.zeros((0,))), rows


def principal_components(features: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """(N, k) coordinates of the centred features on their first k principal axes, and the
  fraction of the variance each axis explains."""
  centred = features.astype(np.float64) - features.mean(axis=0)
  _, singular, axes = np.linalg.svd(centred, full_matrices=False)
  variance = singular ** 2
  explained = variance[:k] / variance.sum() if variance.sum() > 0 else np.zeros(k)
  return centred @ axes[:k].T, explained


def plot_features(output_dir: str, path: str | None = None, max_legend: int = 20) -> str | None:
  """features.png: every extracted video's clip features on their first two principal axes,
  coloured by class (grey where the label is unknown). None when fewer than 3 videos."""
  import matplotlib
  from msca_jax.train import evaluate
  clips, rows = load(output_dir, "clips")
  if len(rows) < 3:
    return None
  coords, explained = principal_components(clips)
  names = [r["label_name"] or "unlabelled" for r in rows]
  classes = sorted(set(names))
  fig = evaluate.new_figure(6.5, 5.0)
  ax = fig.add_subplot()
  colours = matplotlib.colormaps["tab20" if len(classes) > 10 else "tab10"]
  for i, name in enumerate(classes):
    chosen = np.array([n == name for n in names])
    colour = "grey" if name == "unlabelled" else colours(i % colours.N)
    ax.scatter(coords[chosen, 0], coords[chosen, 1], s=10, color=colour, alpha=0.8, label=name)
  ax.set_xlabel(f"principal component 1 ({100 * explained[0]:.0f} % of the variance)")
  ax.set_ylabel(f"principal component 2 ({100 * explained[1]:.0f} % of the variance)")
  ax.set_title(f"clip features of {len(rows)} videos")
  ax.grid(alpha=0.3)
  if len(classes) <= max_legend:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
  path = path or os.path.join(output_dir, "features.png")
  evaluate.save_figure(fig, path)
  return path


# ---------------------------------------------------------------------------------------------
# The command line.


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  inference.define_model_flags(flag_values)
  flags.DEFINE_string("output_dir", None, "Where the shards and the index go.",
                      flag_values=flag_values)
  flags.DEFINE_string("split", None, "A split of config.data, e.g. validation.",
                      flag_values=flag_values)
  flags.DEFINE_string("videos", None, "A video file, a folder of them, or a list file (.txt).",
                      flag_values=flag_values)
  flags.DEFINE_enum("views", "test", list(inference.VIEWS), "test: config.data.eval_*; val: "
                    "config.data.val_*.", flag_values=flag_values)
  flags.DEFINE_integer("shard_size", 256, "Videos per shard.", flag_values=flag_values)
  flags.DEFINE_integer("batch_size", None, "Videos per model call (default config.eval.batch_size).",
                       flag_values=flag_values)
  flags.DEFINE_bool("per_frame", True, "Also write the per-view, per-frame features.",
                    flag_values=flag_values)


def main(argv: Sequence[str]) -> int:
  """0 when something was extracted; 2 (one line on stderr) for a mistake in the inputs."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  if fv.config is None or not fv.checkpoint or not fv.output_dir:
    raise app.UsageError("--config, --checkpoint, --output_dir and one of --split / --videos are "
                         "required")
  if (fv.split is None) == (fv.videos is None):
    raise app.UsageError("give exactly one of --split and --videos")
  from msca_jax import progress
  inference.start_program(fv)
  progress.quiet_library_logs()
  config = fv.config
  try:
    paths = inference.list_videos(fv.videos) if fv.videos is not None else None
  except inference.InferenceError as e:  # its messages name predict's --video flag
    raise UserError(str(e).replace("--video ", "--videos ", 1)) from None
  model = inference.load_model(config, fv.checkpoint)  # decoded as its training data was
  meta = extract(config, model.params, fv.output_dir, split=fv.split, paths=paths, views=fv.views,
                 shard_size=fv.shard_size, batch_size=fv.batch_size, per_frame=fv.per_frame,
                 decode=model.decode)
  skipped = sum(meta["skipped"].values())
  print(f"extracted  {meta['extracted']} of {meta['videos']} videos ({meta['input']}), "
        f"{skipped} skipped{' ' + json.dumps(meta['skipped']) if skipped else ''}")
  print(f"features   per video {'(V, T, D) = ' + str(tuple(meta['view_shape'])) + ' and ' if meta['per_frame'] else ''}"
        f"the clip average (D,) = ({meta['view_shape'][-1]},); {meta['protocol']}")
  print(f"wrote      {meta['shards']} shards and {os.path.join(fv.output_dir, 'index.csv')}")
  picture = plot_features(fv.output_dir)
  if picture:
    print(f"plot       {picture}")
  if meta["videos"] and not meta["extracted"]:
    raise UserError(f"none of the {meta['videos']} videos could be read")
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main)
