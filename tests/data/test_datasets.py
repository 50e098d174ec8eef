"""SSv2, UCF101 and HMDB51 from stand-ins of their official files: VP9 webm and MPEG-4 Part 2 avi videos
(32x32, a few frames) and the real JSON / txt formats, through prepare_videos --dataset to the
frame-folder lists, every split, and the bad entries reported and counted."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from msca_jax.configs import recipe, validation
from msca_jax.data import datasets, frames, sources, video
from msca_jax.data.errors import DataError
from msca_jax.errors import UserError
from msca_jax.tools import prepare_videos

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SSV2_CLASSES = ["Holding something", "Pushing something from left to right",
                "Pushing something from right to left"]
UCF_CLASSES = ["ApplyEyeMakeup", "Basketball"]
HMDB_CLASSES = ["brush_hair", "wave"]   # sorted, as the readers give them


def write_clip(path, level: int, codec: str, num_frames: int = 5, fps: float = 12.0) -> None:
  levels = (level + 5 * np.arange(num_frames)) % 256
  frames_ = np.broadcast_to(levels[:, None, None, None], (num_frames, 32, 32, 3)).astype(np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  video.write_video(str(path), frames_, fps, codec=codec)


def write_garbage(path) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(np.random.RandomState(0).bytes(2000))


def write_text(path, lines) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(line + "\n" for line in lines))


def make_ssv2(root, naming=datasets.SSV2_FILES, test_ids=()) -> tuple[str, str]:
  """SSv2's files under `naming`'s names; a test JSON of `test_ids` (the even ones have videos)."""
  ann, videos = os.path.join(root, "annotations"), os.path.join(root, "videos")
  os.makedirs(ann)
  with open(os.path.join(ann, naming["labels"]), "w") as f:
    json.dump({name: str(i) for i, name in enumerate(SSV2_CLASSES)}, f)   # index order kept

  def entry(i, template):
    return {"id": str(i), "label": template.lower(), "template": template, "placeholders": ["x"]}

  templates = ["Holding [something]", "Pushing [something] from left to right",
               "Pushing [something] from right to left"]
  train = [entry(10 + i, templates[i % 3]) for i in range(6)]
  validation = [entry(20, templates[1]), entry(21, templates[2]),
                entry(22, "Spinning [something]"),        # not in the labels
                entry(23, templates[0]),                  # its video is missing
                entry(24, templates[0])]                  # its video is not a video
  for name, items in (("train", train), ("validation", validation)):
    with open(os.path.join(ann, naming[name]), "w") as f:
      json.dump(items, f)
  if test_ids:
    with open(os.path.join(ann, naming["test"]), "w") as f:
      json.dump([{"id": str(i)} for i in test_ids], f)   # the test JSON: ids only, no labels
  for item in train + validation[:2] + [{"id": str(i)} for i in test_ids if i % 2 == 0]:
    write_clip(os.path.join(videos, f"{item['id']}.webm"), 40 * int(item["id"]) % 250, "libvpx-vp9")
  write_garbage(os.path.join(videos, "24.webm"))
  return ann, videos


def make_ucf101(root) -> tuple[str, str]:
  """Two classes x three groups; split n tests on group n (as the official lists do)."""
  ann, videos = os.path.join(root, "ucfTrainTestlist"), os.path.join(root, "UCF-101")
  write_text(os.path.join(ann, "classInd.txt"), [f"{i + 1} {c}" for i, c in enumerate(UCF_CLASSES)])
  rel = {(c, g): f"{c}/v_{c}_g0{g}_c01.avi" for c in UCF_CLASSES for g in (1, 2, 3)}
  for n in (1, 2, 3):
    write_text(os.path.join(ann, f"trainlist0{n}.txt"),
               [f"{rel[c, g]} {i + 1}" for i, c in enumerate(UCF_CLASSES) for g in (1, 2, 3) if g != n])
    write_text(os.path.join(ann, f"testlist0{n}.txt"), [rel[c, n] for c in UCF_CLASSES])
  for i, key in enumerate(sorted(rel.values())):
    write_clip(os.path.join(videos, key), 30 + 30 * i, "mpeg4", fps=25.0)
  return ann, videos


def make_hmdb51(root) -> tuple[str, str]:
  """Per class: a trains in splits 1 and 2, b tests in 1 and trains in 3, c tests in 2 and 3."""
  ann, videos = os.path.join(root, "splits"), os.path.join(root, "hmdb51")
  ids = {1: {"a": 1, "b": 2, "c": 0}, 2: {"a": 1, "b": 0, "c": 2}, 3: {"a": 0, "b": 1, "c": 2}}
  for c in HMDB_CLASSES:
    for n in (1, 2, 3):
      write_text(os.path.join(ann, f"{c}_test_split{n}.txt"),
                 [f"{c}_{v}.avi {ids[n][v]} " for v in "abc"])   # the official lines end in a blank
    for j, v in enumerate("abc"):
      write_clip(os.path.join(videos, c, f"{c}_{v}.avi"), 50 + 60 * j, "mpeg4", fps=30.0)
  return ann, videos


def read_list(output, split) -> dict[str, int]:
  """folder -> label of a prepared list."""
  listed = frames.read_list(frames.list_path(output, split))
  return dict(zip(listed.folders, listed.labels.tolist()))


def prepare(dataset, ann, videos, output):
  return prepare_videos.prepare_dataset(dataset, ann, videos, str(output), short_side=32, workers=0,
                                        progress_stream=io.StringIO())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("official")
  out = {}
  for name, make in (("ssv2", make_ssv2), ("ucf101", make_ucf101), ("hmdb51", make_hmdb51)):
    ann, videos = make(str(root / name))
    output = root / f"{name}_frames"
    out[name] = (ann, videos, output, *prepare(name, ann, videos, output))
  return out


# ------------------------------------------------------------------------------------ SSv2

def test_ssv2_classes_come_from_the_labels_json_in_index_order(prepared):
  ann, videos, output, _, _ = prepared["ssv2"]
  assert datasets.read_ssv2_labels(os.path.join(ann, datasets.SSV2_FILES["labels"])) == SSV2_CLASSES
  with open(os.path.join(output, "labels.txt")) as f:
    assert f.read().split("\n")[:3] == SSV2_CLASSES
  # Template without brackets -> label: ids 10..15 cycle through the three templates.
  assert read_list(output, "train") == {f"train/{10 + i}": i % 3 for i in range(6)}


def test_ssv2_bad_validation_entries_are_reported_skipped_and_counted(prepared):
  _, _, output, summaries, _ = prepared["ssv2"]
  validation = next(s for s in summaries if s.split == "validation")
  assert read_list(output, "validation") == {"validation/20": 1, "validation/21": 2}
  assert validation.videos_written == 2 and validation.videos_total == 5
  reasons = {f.key: f.reason for f in validation.failures}
  assert set(reasons) == {"22", "23", "24"}
  assert "not in the labels JSON" in reasons["22"]
  assert "not found" in reasons["23"]
  assert reasons["24"]   # undecodable: the decoder's own reason
  with open(os.path.join(output, "validation.failures.tsv")) as f:
    assert len(f.read().strip().split("\n")) == 1 + 3


def test_ssv2_as_downloaded_today_with_its_unlabelled_test_set_for_predict(prepared, tmp_path):
  from msca_jax import inference
  old_ann, _, old_output, _, old_lists = prepared["ssv2"]   # 20BN's names, no test JSON
  assert old_lists == [] and not os.path.exists(os.path.join(old_output, datasets.SSV2_TEST_LIST))
  ann, videos = make_ssv2(str(tmp_path / "ssv2"), naming=datasets.SSV2_NAMINGS[0], test_ids=(30, 31, 32))
  assert sorted(os.listdir(ann)) == ["labels.json", "test.json", "train.json", "validation.json"]
  output = tmp_path / "frames"
  summaries, lists = prepare("ssv2", ann, videos, output)
  assert [s.split for s in summaries] == ["train", "validation"]
  for split in ("train", "validation"):
    assert read_list(output, split) == read_list(old_output, split)
  with open(os.path.join(output, "labels.txt")) as f:
    assert f.read().split("\n")[:3] == SSV2_CLASSES
  test_list = os.path.join(output, datasets.SSV2_TEST_LIST)
  want = [os.path.abspath(os.path.join(videos, f"{i}.webm")) for i in (30, 32)]
  assert inference.list_videos(test_list) == want
  assert [entry.format() for entry in lists] == [
      f"split 'test': 2 of 3 videos listed in {test_list}, unlabelled: for predict "
      f"--video={test_list}, not for evaluation; 1 not found (31)"]
  assert not os.path.exists(frames.list_path(str(output), "test"))   # not an evaluation split

  # Each file under either name; a missing one names both.
  mixed = tmp_path / "mixed"
  os.makedirs(mixed)
  for role, name in (("labels", "labels.json"), ("train", datasets.SSV2_FILES["train"]),
                     ("validation", "validation.json")):
    (mixed / name).write_text("[]")
  assert datasets.ssv2_files(str(mixed)) == {
      "labels": str(mixed / "labels.json"), "train": str(mixed / datasets.SSV2_FILES["train"]),
      "validation": str(mixed / "validation.json")}
  os.remove(mixed / "validation.json")
  with pytest.raises(DataError, match=r"mixed: no Something-Something v2 validation file: neither "
                     r"validation\.json nor something-something-v2-validation\.json is there$"):
    prepare("ssv2", str(mixed), videos, tmp_path / "none")


def test_ssv2_keeps_every_frame_and_the_recipe_refuses_flips(prepared):
  _, _, output, _, _ = prepared["ssv2"]
  assert set(read_frame_counts(output, "train")) == {5}
  config = recipe.get_config("msca", "ssv2")
  assert config.data.flip_prob == 0.0 and config.data.sampling == "uniform"
  config.data.flip_prob = 0.5
  with pytest.raises(UserError, match=r"^config\.data\.flip_prob = 0\.5: expected 0 for Something"):
    validation._check_flips(config.data)


def read_frame_counts(output, split):
  return frames.read_list(frames.list_path(output, split)).num_frames.tolist()


# ------------------------------------------------------------------------------------ UCF101 / HMDB51

@pytest.mark.parametrize("n", [1, 2, 3])
def test_ucf101_every_split_labels_from_the_class_folder(prepared, n):
  _, _, output, _, counts = prepared["ucf101"]
  test = read_list(output, f"test{n}")
  assert test == {f"videos/{c}/v_{c}_g0{n}_c01": i for i, c in enumerate(UCF_CLASSES)}
  train = read_list(output, f"train{n}")
  assert len(train) == 4 and not set(train) & set(test)
  assert all(folder.split("/")[1] == UCF_CLASSES[label] for folder, label in train.items())
  assert {c.split: (c.listed, c.written) for c in counts}[f"test{n}"] == (2, 2)


def test_ucf101_frames_are_stored_once_and_a_rerun_resumes(prepared):
  ann, videos, output, summaries, _ = prepared["ucf101"]
  assert [s.videos_written for s in summaries] == [6]
  again, counts = prepare("ucf101", ann, videos, output)
  assert again[0].videos_written == 0 and again[0].videos_done_before == 6
  assert len(counts) == 6


@pytest.mark.parametrize("n", [1, 2, 3])
def test_hmdb51_every_split_takes_1_as_train_2_as_test_and_skips_0(prepared, n):
  _, _, output, _, _ = prepared["hmdb51"]
  want = {1: ("a", "b"), 2: ("a", "c"), 3: ("b", "c")}[n]
  assert read_list(output, f"train{n}") == {
      f"videos/{c}/{c}_{want[0]}": i for i, c in enumerate(HMDB_CLASSES)}
  assert read_list(output, f"test{n}") == {
      f"videos/{c}/{c}_{want[1]}": i for i, c in enumerate(HMDB_CLASSES)}


def test_prepared_splits_give_batches(prepared):
  _, _, output, _, _ = prepared["hmdb51"]
  config = recipe.get_config("vit", "hmdb51")
  config.data.path = str(output)
  config.data.eval_split = "test2"
  source = sources.make_source(config.data, "test2")
  assert source.num_records == 2 and list(source.class_names) == HMDB_CLASSES
  assert source.decode.fps == 25.0 and source.decode.short_side == 32


def test_bad_official_lines_name_the_file_and_line(tmp_path):
  ann, videos = make_ucf101(str(tmp_path / "ucf"))
  write_text(os.path.join(ann, "trainlist02.txt"), ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 2"])
  with pytest.raises(DataError, match=r"trainlist02\.txt line 1: label 2 but the folder is class 1"):
    datasets.read_official("ucf101", ann, videos)
  write_text(os.path.join(ann, "classInd.txt"), ["1 ApplyEyeMakeup", "3 Basketball"])
  with pytest.raises(DataError, match=r"classInd\.txt line 2: index 3, expected 2"):
    datasets.read_official("ucf101", ann, videos)
  hmdb, hvideos = str(tmp_path / "h" / "splits"), str(tmp_path / "h")
  write_text(os.path.join(hmdb, "wave_test_split1.txt"), ["a.avi 3"])
  with pytest.raises(DataError, match=r"wave_test_split2\.txt is missing"):
    datasets.read_official("hmdb51", hmdb, hvideos)
  for n in (2, 3):
    write_text(os.path.join(hmdb, f"wave_test_split{n}.txt"), ["a.avi 1"])
  with pytest.raises(DataError, match=r"wave_test_split1\.txt line 1: expected 'video\.avi 0\|1\|2'"):
    datasets.read_official("hmdb51", hmdb, hvideos)


def test_command_line_prepares_hmdb51(tmp_path):
  ann, videos = make_hmdb51(str(tmp_path / "h"))
  command = [sys.executable, "-m", "msca_jax.tools.prepare_videos", "--dataset=hmdb51",
             f"--annotations={ann}", f"--video_root={videos}", f"--output={tmp_path / 'out'}",
             "--short_side=32", "--workers=0"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "split 'test3': 2 of 2 videos listed" in done.stdout
  assert read_list(tmp_path / "out", "train1") == {
      f"videos/{c}/{c}_a": i for i, c in enumerate(HMDB_CLASSES)}


def test_recipes_combine_with_variants_but_not_with_demo_or_each_other():
  for variant in ("vit", "tokenshift", "msca_kv"):
    from msca_jax.configs import get as load
    config = load(variant, "ucf101")
    assert (config.model.num_classes, config.data.eval_split, config.train.layer_decay) == (101, "test1", 0.7)
  assert load("msca_kv", "k400").to_dict() == load("msca_kv").to_dict()
  with pytest.raises(ValueError, match="'ssv2' and 'demo' do not combine"):
    load("vit", "ssv2,demo")
  with pytest.raises(ValueError, match="names two datasets"):
    load("vit", "ucf101,hmdb51")
