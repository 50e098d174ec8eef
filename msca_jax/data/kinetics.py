"""Kinetics-400/600/700 as a tensorflow-datasets builder, from a manual download.

The builder is registered as `kinetics` (TFDS has no built-in of that name), with configs `400`,
`600` and `700`. Videos are decoded with PyAV (`video.iter_frames`), resampled to the config's
fps (25 by default, the rate the 8x32 recipe's stride assumes) and short side (256), and stored
as one JPEG per frame.

Features of one example:
  'video'     tfds.features.Video(shape=(None, None, None, 3), encoding_format='jpeg')
  'label'     tfds.features.ClassLabel(num_classes=N): the index of the class in the SORTED class
              names of train.csv (the official Kinetics order is alphabetical)
  'video_id'  tfds.features.Text(): the downloader stem '{youtube_id}_{start:06d}_{end:06d}'

The class names are only known once train.csv has been read, so `_info` declares
ClassLabel(num_classes=N) and preparation fills in the names; TFDS saves them as
`label.labels.txt` next to `dataset_info.json` and restores them on load, so after preparation
`builder.info.features['label'].names` (and `int2str`) give the class names. `info.metadata` holds
the fps / short side / JPEG quality used and, per split, how many CSV rows were skipped and why.

Preparing (needs no network; `tfds build` is not needed either):

  python -m msca_jax.data.kinetics --manual_dir=/data/k400_raw --data_dir=/data/tfds --config=400

or `kinetics.prepare(manual_dir, data_dir, '400')`. Reading:

  import msca_jax.data.kinetics  # registers the builder
  ds = tfds.load('kinetics/400', split='train', data_dir=DATA_DIR, download=False,
                 decoders={'video': tfds.decode.SkipDecoding()})

With SkipDecoding, 'video' is a tf.string tensor of shape (T,) holding one encoded JPEG per frame
(decode only the frames a clip needs, e.g. with tf.io.decode_jpeg), 'label' is int64 and
'video_id' a tf.string. Without it, 'video' is decoded to uint8 (T, H, W, 3).

A prepared custom config (e.g. KineticsConfig(name='400_10fps', num_classes=400, fps=10)) loads
by name too: `tfds.load('kinetics/400_10fps', data_dir=...)` falls back to the files on disk.

Rows that cannot be used (a video that is missing or fails to decode, a label that is not a
train.csv class, a repeated row) are skipped, counted and summarised in the log per split; they
never abort the preparation. Train and validation must keep at least one usable row each.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from absl import app, flags, logging
import tensorflow_datasets as tfds

from msca_jax.data import annotations, video
from msca_jax.data.errors import DataError
from msca_jax.data.decode import DecodeSettings

# Split name -> accepted CSV file names, in order of preference.
CSV_NAMES = {
    "train": ("train.csv",),
    "validation": ("validate.csv", "val.csv"),
    "test": ("test.csv",),
}
# Where the CSVs may sit, relative to the manual dir.
CSV_DIRS = ("", "annotations")
# How many skipped rows per reason the summary quotes.
_EXAMPLES_PER_REASON = 3

_T = TypeVar("_T")
_R = TypeVar("_R")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Kinetics videos are YouTube clips; download them with one of the usual Kinetics downloaders and
put everything under one manual directory:

  MANUAL_DIR/
    train.csv            official annotation CSVs, header: label,youtube_id,time_start,time_end,split
    validate.csv         (val.csv is accepted too)
    test.csv             optional; becomes the 'test' split only if it has labels
    ...videos...         anywhere below MANUAL_DIR, flat or one folder per class, named
                         {youtube_id}_{time_start:06d}_{time_end:06d}.mp4 (other video extensions
                         such as .webm or .mkv work too)

The CSVs may also sit in MANUAL_DIR/annotations/. Class indices follow the sorted class names of
train.csv, which must hold exactly the config's number of classes. Missing or broken videos are
skipped and reported, so a partial download still prepares.
"""


@dataclasses.dataclass(eq=False)
class KineticsConfig(tfds.core.BuilderConfig):
  """A Kinetics variant and how its videos are stored.

  Attributes:
    num_classes: classes in train.csv (400, 600 or 700 for the official sets).
    fps: frame rate every video is resampled to (0 keeps the decoded frames as they are).
    short_side: the shorter image side after resizing, in pixels (0 keeps the size).
    jpeg_quality: quality of the per-frame JPEGs, 0-100 (the project's default,
      msca_jax.data.decode.DecodeSettings, as prepare_videos; lower values save disk space).
  """
  num_classes: int = 400
  fps: float = 25.0
  short_side: int = 256
  jpeg_quality: int = DecodeSettings.jpeg_quality

  def __post_init__(self):
    # A bad value here would otherwise surface as every single video failing to encode.
    if self.num_classes < 1 or self.fps < 0 or self.short_side < 0:
      raise DataError(f"KineticsConfig {self.name!r}: num_classes must be >= 1 and fps, "
                      f"short_side >= 0 (got {self.num_classes}, {self.fps}, {self.short_side})")
    if not 0 <= self.jpeg_quality <= 100:
      raise DataError(f"KineticsConfig {self.name!r}: jpeg_quality must be in [0, 100], "
                      f"not {self.jpeg_quality}")
    # dataset_info.json keeps only the config's name and description, so the description says
    # how the frames were made (info.metadata has the same values as numbers).
    if self.description is None:
      self.description = (f"Kinetics-{self.num_classes}: {self.fps:g} fps, short side "
                          f"{self.short_side}, JPEG quality {self.jpeg_quality}.")


def find_csvs(manual_dir: str) -> dict[str, str]:
  """The annotation CSV of each split found in `manual_dir` (train and validation are required)."""
  found = {}
  for split, names in CSV_NAMES.items():
    # The official name wins over val.csv wherever it is; then the top level over annotations/.
    candidates = [os.path.join(manual_dir, d, n) for n in names for d in CSV_DIRS]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path:
      found[split] = path
    elif split != "test":
      raise DataError(f"Kinetics manual dir {manual_dir}: no {split} annotation CSV (looked for "
                      f"{', '.join(os.path.relpath(p, manual_dir) for p in candidates)}).\n\n"
                      f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return found


def encode_frames(path: str, fps: float, short_side: int, quality: int) -> list[bytes]:
  """One JPEG per frame of `path`, resampled and resized as `video.iter_frames` does."""
  return video.jpeg_frames(path, fps=fps, short_side=short_side, quality=quality)


def _map_ahead(fn: Callable[[_T], _R], items: Iterable[_T],
               workers: int) -> Iterator[tuple[_T, concurrent.futures.Future]]:
  """(item, future of fn(item)) in input order, with at most 2 * workers calls in flight."""
  # Threads suffice: PyAV decoding and TF's JPEG encoder release the GIL. The bound keeps memory
  # flat when the TFDS writer is slower than decoding.
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    pending = collections.deque()
    for item in items:
      pending.append((item, pool.submit(fn, item)))
      if len(pending) >= 2 * max(1, workers):
        yield pending.popleft()
    while pending:
      yield pending.popleft()


class _SkipLog:
  """Counts the rows of one split that were skipped, by reason, with a few examples each."""

  def __init__(self, split: str, csv_path: str):
    self.split = split
    self.csv_path = csv_path
    self.rows = 0
    self.counts: collections.Counter[str] = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)

  def add(self, reason: str, message: str) -> None:
    self.counts[reason] += 1
    if len(self.examples[reason]) < _EXAMPLES_PER_REASON:
      self.examples[reason].append(message)

  def summary(self) -> str:
    skipped = sum(self.counts.values())
    text = (f"Kinetics {self.split} ({self.csv_path}): {self.rows - skipped} of {self.rows} rows "
            f"written, {skipped} skipped")
    if not skipped:
      return text + "."
    text += ": " + ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common()) + "."
    for reason, messages in self.examples.items():
      text += f"\n  {reason}, e.g.: " + "; ".join(messages)
    return text


def _skip_reason(entry: annotations.Entry) -> str:
  """A short category for an entry that `annotations` flagged as unusable."""
  if entry.path is None:
    return "missing video"
  return "no label" if entry.label_name is None else "unknown label"


# Run as `python -m msca_jax.data.kinetics`, this file is also imported under its package name
# (see the bottom), which registers `kinetics`; registering it twice would be an error.
class Kinetics(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
  """Kinetics from a manual download of the videos and the official CSVs."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: PyAV decoding, fps and short-side resampling."}
  BUILDER_CONFIGS = [KineticsConfig(name=str(n), num_classes=n) for n in (400, 600, 700)]
  DEFAULT_CONFIG_NAME = "400"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, workers: int | None = None, **kwargs):
    """See tfds.core.DatasetBuilder; `workers` videos are decoded at a time (default: CPU count)."""
    self.workers = workers or os.cpu_count() or 1
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return self.dataset_info_from_configs(
        description="Kinetics human action video clips (~10 s YouTube clips).",
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Video(shape=(None, None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=config.num_classes),
            "video_id": tfds.features.Text(),
        }),
        supervised_keys=("video", "label"),
        homepage="https://github.com/google-deepmind/kinetics-i3d",
        citation="""@article{kay2017kinetics,
  title={The Kinetics Human Action Video Dataset},
  author={Kay, Will and Carreira, Joao and Simonyan, Karen and Zhang, Brian and Hillier, Chloe
          and Vijayanarasimhan, Sudheendra and Viola, Fabio and Green, Tim and Back, Trevor
          and Natsev, Paul and Suleyman, Mustafa and Zisserman, Andrew},
  journal={arXiv preprint arXiv:1705.06950},
  year={2017}
}""",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    csvs = find_csvs(manual_dir)
    config = self.builder_config
    videos = annotations.index_videos(manual_dir)  # one walk of the tree for every CSV
    entries = {split: annotations.read_kinetics_csv(path, videos=videos)
               for split, path in csvs.items()}
    class_names = annotations.sorted_class_names(entries["train"])
    if len(class_names) != config.num_classes:
      raise DataError(
          f"{csvs['train']} names {len(class_names)} classes but config {config.name!r} expects "
          f"{config.num_classes}; use the matching config (400/600/700) or a KineticsConfig "
          f"with num_classes={len(class_names)}")
    # Only possible now: the names come from train.csv. TFDS writes them to label.labels.txt.
    self.info.features["label"].names = class_names
    self.info.metadata.update(fps=config.fps, short_side=config.short_side,
                              jpeg_quality=config.jpeg_quality, skipped={})

    if "test" in entries and not any(e.label_name for e in entries["test"]):
      logging.info("Kinetics: %s has no labels; no test split.", csvs["test"])
      del entries["test"]

    generators = {}
    for split, split_entries in entries.items():
      skips = _SkipLog(split, csvs[split])
      usable = self._usable(annotations.assign_labels(split_entries, class_names), skips)
      if not usable:
        if split == "test":
          logging.warning("Kinetics: no usable row in %s; no test split.\n%s", csvs[split],
                          skips.summary())
          continue
        # Decoding the other splits first would waste hours before TFDS fails on an empty split.
        raise DataError(f"Kinetics: no usable row in {csvs[split]} (are the videos below "
                        f"{manual_dir}?)\n{skips.summary()}")
      generators[split] = self._generate_examples(usable, skips)
    return generators

  @staticmethod
  def _usable(entries: Sequence[annotations.Entry],
              skips: _SkipLog) -> list[annotations.Entry]:
    """The entries that can be decoded; the others are logged in `skips`."""
    usable, seen = [], set()
    for entry in entries:
      skips.rows += 1
      if entry.error:
        skips.add(_skip_reason(entry), entry.error)
      elif entry.key in seen:
        # TFDS aborts on duplicate keys; the video is already in the split once.
        skips.add("repeated row", f"{entry.key} appears more than once")
      else:
        seen.add(entry.key)
        usable.append(entry)
    return usable

  def _generate_examples(self, entries: Sequence[annotations.Entry], skips: _SkipLog):
    config = self.builder_config

    def encode(entry: annotations.Entry) -> list[bytes]:
      return encode_frames(entry.path, config.fps, config.short_side, config.jpeg_quality)

    for entry, future in _map_ahead(encode, entries, self.workers):
      try:
        frames = future.result()
      except Exception as e:  # pylint: disable=broad-except
        # One broken file among hundreds of thousands must not end a days-long preparation;
        # VideoError is the usual case, anything else (a PyAV ValueError...) is reported as well.
        skips.add("undecodable video", str(e) if isinstance(e, video.VideoError)
                  else f"{entry.path}: {type(e).__name__}: {e}")
        continue
      # Encoded JPEG bytes pass through tfds.features.Video unchanged (one per frame).
      yield entry.key, {"video": frames, "label": entry.label, "video_id": entry.key}

    self.info.metadata["skipped"][skips.split] = dict(skips.counts)
    if skips.counts:
      logging.warning("%s", skips.summary())
    else:
      logging.info("%s", skips.summary())


def prepare(manual_dir: str, data_dir: str, config: str | KineticsConfig = "400", *,
            workers: int | None = None) -> tfds.core.DatasetBuilder:
  """Builds `kinetics/<config>` in `data_dir` from `manual_dir` and returns the builder."""
  if not os.path.isdir(manual_dir):
    raise DataError(f"Kinetics manual dir {manual_dir} does not exist.\n\n"
                    f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  builder = Kinetics(config=config, data_dir=data_dir, workers=workers)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def define_flags() -> None:
  """The CLI's flags; defined on demand, so importing this module leaves absl's FLAGS alone."""
  flags.DEFINE_string("manual_dir", None, "Videos and annotation CSVs (see the module doc).")
  flags.DEFINE_string("data_dir", None, "TFDS data directory to write to.")
  flags.DEFINE_string("config", "400", "400, 600 or 700.")
  flags.DEFINE_float("fps", None, "Frame rate (default: the config's, 25).")
  flags.DEFINE_integer("short_side", None, "Short side in pixels (default: the config's, 256).")
  flags.DEFINE_integer("jpeg_quality", None, "JPEG quality, 0-100 (default: the config's, 90).")
  flags.DEFINE_integer("workers", None, "Videos decoded at a time (default: the CPU count).")


def main(argv: Sequence[str]) -> None:
  """`python -m msca_jax.data.kinetics --manual_dir=... --data_dir=... --config=400`."""
  del argv
  f = flags.FLAGS
  if not f.manual_dir or not f.data_dir:
    raise app.UsageError("--manual_dir and --data_dir are required.\n\n"
                         + MANUAL_DOWNLOAD_INSTRUCTIONS)
  configs = {c.name: c for c in Kinetics.BUILDER_CONFIGS}
  if f.config not in configs:
    raise app.UsageError(f"--config must be one of {sorted(configs)}, not {f.config!r}")
  config = configs[f.config]
  changes = {k: getattr(f, k) for k in ("fps", "short_side", "jpeg_quality")
             if getattr(f, k) is not None and getattr(f, k) != getattr(config, k)}
  if changes:
    # Another storage format is another dataset: give it its own config name and directory.
    suffix = "_".join(f"{k}{v:g}" for k, v in changes.items())
    config = dataclasses.replace(config, name=f"{config.name}_{suffix}", description=None,
                                 **changes)
  builder = prepare(f.manual_dir, f.data_dir, config, workers=f.workers)
  logging.info("Prepared %s in %s: %s", builder.info.full_name, builder.data_dir,
               {name: split.num_examples for name, split in builder.info.splits.items()})
  print(f"tfds.load('kinetics/{config.name}', data_dir={f.data_dir!r})")


if __name__ == "__main__":
  # Use the registered module, so the builder class is the one tfds knows about.
  from msca_jax.data import kinetics as _kinetics  # pylint: disable=import-self
  _kinetics.define_flags()
  flags.adopt_module_key_flags(_kinetics)  # so that --help lists them
  from msca_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(_kinetics.main)
