"""The official annotation files of Something-Something v2, UCF101 and HMDB51 (docs/datasets.md).

Each reader returns the class names in label order and `annotations.Entry` rows. A malformed
file or line is a DataError naming the file and line; a video that is listed but cannot be used
(a template not in the labels, a missing file) is kept as an entry with `error` set, so that
preparation reports, skips and counts it.

  SSv2     labels JSON {"class name": "index"}; train / validation JSON lists of {"id", "label",
           "template", "placeholders"}; the test JSON (optional) a list of {"id"}, unlabelled;
           videos VIDEO_ROOT/{id}.webm. The class is the template without its square brackets.
           Files named as today's release names them (labels.json, train.json, ...) or as
           20BN's did (something-something-v2-labels.json, ...).
  UCF101   classInd.txt ('1 ApplyEyeMakeup', 1-based); trainlist0N.txt ('Class/v_x.avi 1');
           testlist0N.txt ('Class/v_x.avi', labelled by its class folder); videos
           VIDEO_ROOT/Class/v_x.avi.
  HMDB51   {class}_test_split{N}.txt ('name.avi 1'; 1 train, 2 test, 0 unused); classes are the
           sorted class names; videos VIDEO_ROOT/{class}/name.avi.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

from msca_jax.data import annotations, textlist
from msca_jax.data.errors import DataError

DATASETS = ("ssv2", "ucf101", "hmdb51")
OFFICIAL_SPLITS = (1, 2, 3)
# The annotation files' names: today's download, then the original 20BN release. Each file is
# looked for under both; 'test' (unlabelled) is optional.
SSV2_NAMINGS = (
    {"labels": "labels.json", "train": "train.json", "validation": "validation.json",
     "test": "test.json"},
    {"labels": "something-something-v2-labels.json", "train": "something-something-v2-train.json",
     "validation": "something-something-v2-validation.json", "test": "something-something-v2-test.json"},
)
SSV2_FILES = SSV2_NAMINGS[1]  # 20BN's names
SSV2_TEST_LIST = "test_videos.txt"  # the test set's videos, one path a line, for predict --video
_HMDB_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<n>[123])\.txt$")
HMDB_SUBSETS = {"1": "train", "2": "test", "0": None}


def split_names(dataset: str) -> tuple[str, ...]:
  """The prepared splits (lists) of a dataset: train/validation, or train1..3 and test1..3."""
  if dataset == "ssv2":
    return ("train", "validation")
  return tuple(f"{kind}{n}" for n in OFFICIAL_SPLITS for kind in ("train", "test"))


def _load_json(path: str):
  if not os.path.isfile(path):
    raise DataError(f"{path} does not exist")
  try:
    with open(path, encoding="utf-8-sig") as f:
      return json.load(f)
  except ValueError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from e


def ssv2_files(annotations_dir: str) -> dict[str, str]:
  """{'labels', 'train', 'validation'[, 'test']: path} of SSv2's files in either naming.

  Each file is taken under today's name where it is there, else under 20BN's; a missing labels,
  train or validation file is a DataError naming both names.
  """
  if not os.path.isdir(annotations_dir):
    raise DataError(f"--annotations {annotations_dir} is not a directory (expected the folder of "
                    "Something-Something v2's labels.json, train.json and validation.json)")
  found = {}
  for role in SSV2_NAMINGS[0]:
    names = [naming[role] for naming in SSV2_NAMINGS]
    present = [os.path.join(annotations_dir, n) for n in names
               if os.path.isfile(os.path.join(annotations_dir, n))]
    if present:
      found[role] = present[0]
    elif role != "test":
      raise DataError(f"{annotations_dir}: no Something-Something v2 {role} file: neither "
                      f"{' nor '.join(names)} is there")
  return found


@dataclasses.dataclass
class VideoList:
  """An unlabelled split's videos listed for predict (not an evaluation split): SSv2's test set."""
  split: str
  path: str
  listed: int
  missing: list[str]

  def format(self) -> str:
    missing = (f"; {len(self.missing)} not found ({', '.join(self.missing[:3])}"
               f"{' ...' if len(self.missing) > 3 else ''})" if self.missing else "")
    return (f"split {self.split!r}: {self.listed - len(self.missing)} of {self.listed} videos listed "
            f"in {self.path}, unlabelled: for predict --video={self.path}, not for evaluation{missing}")


def write_ssv2_test_list(annotations_dir: str, video_root: str, output: str) -> VideoList | None:
  """OUTPUT/test_videos.txt, the absolute paths of the test JSON's videos that exist; None when
  the annotations have no test file."""
  path = ssv2_files(annotations_dir).get("test")
  if path is None:
    return None
  data = _load_json(path)
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a list of videos")
  videos, missing = [], []
  for i, item in enumerate(data):
    if not isinstance(item, dict) or "id" not in item:
      raise DataError(f"{path} entry {i}: expected an object with 'id'")
    video = os.path.abspath(os.path.join(video_root, f"{item['id']}.webm"))
    if os.path.isfile(video):
      videos.append(video)
    else:
      missing.append(str(item["id"]))
  os.makedirs(output, exist_ok=True)
  listed = os.path.join(output, SSV2_TEST_LIST)
  with open(listed + ".tmp", "w") as f:
    f.write("".join(v + "\n" for v in videos))
  os.replace(listed + ".tmp", listed)
  return VideoList("test", listed, len(data), missing)


def ssv2_template_class(template: str) -> str:
  """'Putting [something] on [something]' -> 'Putting something on something'."""
  return template.replace("[", "").replace("]", "")


def read_ssv2_labels(path: str) -> list[str]:
  """The class names in index order from the labels JSON ({"name": "index"})."""
  data = _load_json(path)
  if not isinstance(data, dict) or not data:
    raise DataError(f"{path}: expected an object mapping class names to indices")
  by_index: dict[int, str] = {}
  for name, index in data.items():
    try:
      i = int(index)
    except (TypeError, ValueError):
      raise DataError(f"{path}: class {name!r} has index {index!r}, expected an integer") from None
    if i in by_index:
      raise DataError(f"{path}: classes {by_index[i]!r} and {name!r} both have index {i}")
    by_index[i] = name
  if sorted(by_index) != list(range(len(by_index))):
    raise DataError(f"{path}: indices are not 0..{len(by_index) - 1}")
  return [by_index[i] for i in range(len(by_index))]


def read_ssv2(entries_json: str, class_names: Sequence[str], video_root: str) -> list[annotations.Entry]:
  """Entries of a train or validation JSON; a template not in the labels or a missing video is
  an entry with its error."""
  data = _load_json(entries_json)
  if not isinstance(data, list):
    raise DataError(f"{entries_json}: expected a list of videos")
  known = set(class_names)
  entries = []
  for i, item in enumerate(data):
    if not isinstance(item, dict) or "id" not in item:
      raise DataError(f"{entries_json} entry {i}: expected an object with 'id' and 'template'")
    key = str(item["id"])
    path = os.path.join(video_root, f"{key}.webm")
    template = item.get("template")
    name = ssv2_template_class(template) if isinstance(template, str) else None
    error = ""
    if name is None:
      error = f"{entries_json} entry {i}: no template (the test set has no labels)"
    elif name not in known:
      error = f"template {template!r} is not in the labels JSON"
    elif not os.path.isfile(path):
      error = f"video {path} not found"
    entries.append(annotations.Entry(key=key, path=path if os.path.isfile(path) else None,
                                     label_name=name, error=error))
  return entries


def read_ucf101_classes(path: str) -> list[str]:
  """classInd.txt: 'index name' lines, 1-based and in order."""
  if not os.path.isfile(path):
    raise DataError(f"{path} does not exist")
  names = []
  for line_no, line in textlist.read_lines(path):
    parts = line.split()
    if len(parts) != 2 or not parts[0].isdigit():
      raise DataError(f"{path} line {line_no}: expected 'index class_name', got {line!r}")
    if int(parts[0]) != len(names) + 1:
      raise DataError(f"{path} line {line_no}: index {parts[0]}, expected {len(names) + 1} "
                      "(indices are 1-based and in order)")
    if parts[1] in names:
      raise DataError(f"{path} line {line_no}: class {parts[1]!r} is named twice")
    names.append(parts[1])
  if not names:
    raise DataError(f"{path} lists no classes")
  return names


def read_ucf101_list(path: str, class_names: Sequence[str], video_root: str) -> list[annotations.Entry]:
  """A trainlist (with 1-based labels) or testlist (without): the class is the video's folder."""
  if not os.path.isfile(path):
    raise DataError(f"{path} does not exist")
  folders = {name.lower(): name for name in class_names}
  entries = []
  for line_no, line in textlist.read_lines(path):
    parts = line.split()
    if len(parts) not in (1, 2) or (len(parts) == 2 and not parts[1].isdigit()) or "/" not in parts[0]:
      raise DataError(f"{path} line {line_no}: expected 'Class/video.avi [label]', got {line!r}")
    relative = parts[0]
    # Matched without case: the official lists spell some folders as classInd.txt does not.
    name = folders.get(relative.split("/")[0].lower())
    if name is None:
      raise DataError(f"{path} line {line_no}: class folder {relative.split('/')[0]!r} is not "
                      "in classInd.txt")
    if len(parts) == 2 and int(parts[1]) != class_names.index(name) + 1:
      raise DataError(f"{path} line {line_no}: label {parts[1]} but the folder is class "
                      f"{class_names.index(name) + 1} ({name})")
    video = os.path.join(video_root, relative)
    found = os.path.isfile(video)
    entries.append(annotations.Entry(key=relative, path=video if found else None, label_name=name,
                                     error="" if found else f"video {video} not found"))
  return entries


def hmdb51_split_files(directory: str) -> dict[tuple[str, int], str]:
  """(class, split number) -> the split file, for every {class}_test_split{N}.txt in `directory`."""
  if not os.path.isdir(directory):
    raise DataError(f"{directory} is not a directory (expected the HMDB51 split files)")
  files = {}
  for name in sorted(os.listdir(directory)):
    match = _HMDB_FILE.match(name)
    if match:
      files[(match["cls"], int(match["n"]))] = os.path.join(directory, name)
  classes = sorted({c for c, _ in files})
  if not classes:
    raise DataError(f"{directory} holds no {{class}}_test_split{{1,2,3}}.txt files")
  for c in classes:
    for n in OFFICIAL_SPLITS:
      if (c, n) not in files:
        raise DataError(f"{directory}: {c}_test_split{n}.txt is missing")
  return files


def read_hmdb51(directory: str, video_root: str) -> tuple[list[str], dict[str, list[annotations.Entry]]]:
  """(sorted class names, {'train1': entries, 'test1': ..., ...}) from the split files."""
  files = hmdb51_split_files(directory)
  classes = sorted({c for c, _ in files})
  splits: dict[str, list[annotations.Entry]] = {name: [] for name in split_names("hmdb51")}
  for (cls, n), path in sorted(files.items()):
    for line_no, line in textlist.read_lines(path):
      parts = line.split()
      if len(parts) != 2 or parts[1] not in HMDB_SUBSETS:
        raise DataError(f"{path} line {line_no}: expected 'video.avi 0|1|2', got {line!r}")
      subset = HMDB_SUBSETS[parts[1]]
      if subset is None:
        continue
      key = f"{cls}/{parts[0]}"
      video = os.path.join(video_root, cls, parts[0])
      found = os.path.isfile(video)
      splits[f"{subset}{n}"].append(annotations.Entry(
          key=key, path=video if found else None, label_name=cls,
          error="" if found else f"video {video} not found"))
  return classes, splits


def read_ucf101(directory: str, video_root: str) -> tuple[list[str], dict[str, list[annotations.Entry]]]:
  """(classes, {'train1': entries, 'test1': ..., ...}) from ucfTrainTestlist/."""
  classes = read_ucf101_classes(os.path.join(directory, "classInd.txt"))
  splits = {}
  for n in OFFICIAL_SPLITS:
    for kind in ("train", "test"):
      splits[f"{kind}{n}"] = read_ucf101_list(os.path.join(directory, f"{kind}list0{n}.txt"),
                                              classes, video_root)
  return classes, splits


def read_official(dataset: str, annotations_dir: str,
                  video_root: str) -> tuple[list[str], dict[str, list[annotations.Entry]]]:
  """(class names, {split: entries}) of a dataset's official files in `annotations_dir`."""
  if dataset not in DATASETS:
    raise DataError(f"--dataset must be one of {DATASETS}, got {dataset!r}")
  if not os.path.isdir(video_root):
    raise DataError(f"--video_root {video_root} is not a directory")
  if dataset == "ssv2":
    files = ssv2_files(annotations_dir)
    classes = read_ssv2_labels(files["labels"])
    return classes, {split: read_ssv2(files[split], classes, video_root)
                     for split in ("train", "validation")}
  if dataset == "ucf101":
    return read_ucf101(annotations_dir, video_root)
  return read_hmdb51(annotations_dir, video_root)
