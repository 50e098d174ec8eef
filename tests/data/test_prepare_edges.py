"""prepare_videos at the edges: symlinked video trees, text lists saved by other tools, absurd frame
shapes, and frame-list lines that try to leave the dataset root."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from msca_jax.data import annotations, dmvr, frames, sources, textlist
from msca_jax.data.errors import DataError
from tests.data import frame_folders as ff
from tests.data.test_prepare_videos import make_clip, read_split, run


def _touch(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"not decoded by the walk")


def _walk_keys(root):
  notes = []
  entries = annotations.read_class_folders(str(root), notes)
  return {e.key: e.label_name for e in entries}, notes


# --- 1. Symlinks in a class-folder tree ---------------------------------------------------------


def test_the_issues_loop_lists_each_video_once_with_its_own_class(tmp_path, caplog):
  """DIR/walk/loop -> .. used to list every video about 40 times, most under the class 'walk'."""
  tree = tmp_path / "videos"
  make_clip(tree / "abseiling" / "a.mp4", num_frames=2, fps=25, height=16, width=16)
  make_clip(tree / "walk" / "w.mp4", num_frames=3, fps=25, height=16, width=16)
  os.symlink("..", tree / "walk" / "loop")
  with caplog.at_level(logging.WARNING):
    summary = run(tree, tmp_path / "out", short_side=0)
  assert summary.videos_total == 2 and summary.videos_written == 2 and not summary.failures
  records = read_split(tmp_path / "out", "train")
  assert {k: (r["text"], len(r["encoded"])) for k, r in records.items()} == {
      "abseiling/a.mp4": ("abseiling", 2), "walk/w.mp4": ("walk", 3)}
  assert len(summary.walk_notes) == 1 and "walk/loop: not followed" in summary.walk_notes[0]
  assert "not walked    1 paths of the video tree" in summary.format()
  logged = [r.getMessage() for r in caplog.records if "walk/loop" in r.getMessage()]
  assert len(logged) == 1 and "inside the tree" in logged[0]


@pytest.fixture
def linked_tree(tmp_path):
  """Class folders with links into the tree, out of it, loops and a hard link."""
  tree, outside = tmp_path / "videos", tmp_path / "elsewhere"
  for path in ["abseiling/a.mp4", "aardvark/own.mp4", "walk/w.mp4", "walk/deep/d.mp4"]:
    _touch(tree / path)
  _touch(outside / "store" / "e.mp4")
  _touch(outside / "files" / "f.mp4")
  os.symlink("..", tree / "walk" / "loop")                         # a loop to the root
  os.symlink("../walk", tree / "aardvark" / "link")                # another class, sorted first
  os.symlink("../../walk/w.mp4", tree / "walk" / "deep" / "w2.mp4")  # a file inside the tree
  os.makedirs(tree / "juggling")
  os.link(tree / "abseiling" / "a.mp4", tree / "juggling" / "hard.mp4")  # one file, two names
  os.symlink(outside / "store", tree / "zebra")                    # a class folder elsewhere
  os.symlink(outside / "store", outside / "store" / "back")        # a loop outside the tree
  os.symlink(tree / "abseiling", outside / "store" / "in")         # back into the tree
  os.symlink(outside / "files" / "f.mp4", tree / "walk" / "f.mp4")       # a file elsewhere ...
  os.symlink(outside / "files" / "f.mp4", tree / "walk" / "deep" / "f.mp4")  # ... linked twice
  os.symlink(outside / "nothing.mp4", tree / "walk" / "dangling.mp4")
  return tree


def test_links_are_followed_only_out_of_the_tree_and_each_file_is_listed_once(linked_tree):
  keys, notes = _walk_keys(linked_tree)
  assert keys == {
      "aardvark/own.mp4": "aardvark",
      "abseiling/a.mp4": "abseiling",
      "walk/dangling.mp4": "walk",     # listed, so that decoding reports it
      "walk/f.mp4": "walk",            # a link out of the tree: the class holding the link
      "walk/w.mp4": "walk",
      "walk/deep/d.mp4": "walk",
      "zebra/e.mp4": "zebra"}          # a symlinked class folder
  t = str(linked_tree)
  expected = {
      f"{t}/aardvark/link": "not followed, a link to",
      f"{t}/juggling/hard.mp4": f"not listed, the same file as {t}/abseiling/a.mp4",
      f"{t}/walk/deep/f.mp4": f"not listed, the same file as {t}/walk/f.mp4",
      f"{t}/walk/deep/w2.mp4": "not followed, a link to",
      f"{t}/walk/loop": f"not followed, a link to {os.path.realpath(t)} inside the tree",
      f"{t}/zebra/back": f"not walked, the folder {t}/zebra again",
      f"{t}/zebra/in": "not followed, a link to"}
  assert len(notes) == len(expected)
  for path, what in expected.items():
    assert sum(n.startswith(path + ": ") and what in n for n in notes) == 1, (path, notes)


def test_kinetics_index_walks_the_same_way(linked_tree):
  notes = []
  index = annotations.index_videos(str(linked_tree), notes)
  assert sorted(index) == ["a", "d", "dangling", "e", "f", "own", "w"]
  assert index["e"] == str(linked_tree / "zebra" / "e.mp4")
  assert len(notes) == 7


def test_a_symlinked_root_and_an_unreadable_folder(tmp_path):
  _touch(tmp_path / "real" / "a" / "x.mp4")
  os.symlink(tmp_path / "real", tmp_path / "root")
  os.symlink(tmp_path / "root", tmp_path / "real" / "a" / "up")   # the root, by its link's name
  keys, notes = _walk_keys(tmp_path / "root")
  assert keys == {"a/x.mp4": "a"} and len(notes) == 1 and "inside the tree" in notes[0]
  if os.geteuid() != 0:   # root reads any folder
    (tmp_path / "real" / "b").mkdir()
    os.chmod(tmp_path / "real" / "b", 0)
    try:
      keys, notes = _walk_keys(tmp_path / "root")
    finally:
      os.chmod(tmp_path / "real" / "b", 0o755)
    assert keys == {"a/x.mp4": "a"}
    assert any(n.startswith(f"{tmp_path}/root/b: not walked, cannot be listed") for n in notes)


# --- 3. Text lists saved with a BOM, CRLF, blanks -----------------------------------------------


def test_a_class_list_with_bom_crlf_and_blanks_keeps_every_class(tmp_path):
  make_clip(tmp_path / "v" / "abseiling" / "a.mp4", num_frames=2, fps=25, height=16, width=16)
  make_clip(tmp_path / "v" / "juggling" / "j.mp4", num_frames=2, fps=25, height=16, width=16)
  classes = tmp_path / "classes.txt"
  classes.write_bytes(b"\xef\xbb\xbfabseiling \r\n\r\n  \r\njuggling\t\r\nzumba\r\n")
  summary = run(tmp_path / "v", tmp_path / "out", classes=str(classes), short_side=0)
  assert summary.videos_written == 2 and not summary.failures
  assert (tmp_path / "out" / "labels.txt").read_bytes() == b"abseiling\njuggling\nzumba\n"
  assert {k: r["text"] for k, r in read_split(tmp_path / "out", "train").items()} == {
      "abseiling/a.mp4": "abseiling", "juggling/j.mp4": "juggling"}


def test_class_lists_and_labels_files_read_alike(tmp_path):
  path = tmp_path / "c.txt"
  path.write_bytes(b"\xef\xbb\xbfindex,name\r\n0,abseiling\r\n1,\"juggling\"  \r\n")
  assert dmvr.read_class_list(str(path)) == ["abseiling", "juggling"]
  path.write_bytes(b"\xef\xbb\xbfabseiling\rjuggling\r")   # old Mac line ends
  assert dmvr.read_class_list(str(path)) == ["abseiling", "juggling"]
  (tmp_path / "labels.txt").write_bytes(b"\xef\xbb\xbfabseiling\r\njuggling \r\n\r\n")
  assert dmvr.read_labels(str(tmp_path)) == ["abseiling", "juggling"]
  # The same labels.txt is accepted by a rerun that writes these classes.
  dmvr.write_labels(str(tmp_path), ["abseiling", "juggling"])


def test_a_repeated_or_undecodable_class_name_is_an_error_naming_its_line(tmp_path):
  path = tmp_path / "c.txt"
  path.write_bytes(b"\xef\xbb\xbfabseiling\r\njuggling\r\n\r\nabseiling \r\n")
  with pytest.raises(DataError, match=r"c\.txt line 4: class 'abseiling' repeats line 1"):
    dmvr.read_class_list(str(path))
  (tmp_path / "labels.txt").write_bytes(b"a\nb\na\n")
  with pytest.raises(DataError, match=r"labels\.txt line 3: class 'a' repeats line 1"):
    dmvr.read_labels(str(tmp_path))
  path.write_bytes(b"abseiling\njuggl\xe9ing\n")   # Latin-1
  with pytest.raises(DataError, match=r"c\.txt line 2: not UTF-8 text"):
    dmvr.read_class_list(str(path))


def test_frame_lists_with_bom_and_crlf(tmp_path):
  ff.write_video(str(tmp_path), "train/v0", 0, num_frames=2)
  ff.write_video(str(tmp_path), "train/v1", 1, num_frames=2)
  listed = tmp_path / "train.txt"
  listed.write_bytes(b"\xef\xbb\xbftrain/v0 2 0\r\n\r\ntrain/v1 2 1 \r\ntrain/v\xe92 2 1\r\n")
  videos = frames.read_list(str(listed))
  assert videos.folders == ("train/v0", "train/v1") and list(videos.labels) == [0, 1]
  assert len(videos.problems) == 1 and "line 4: not UTF-8 text" in videos.problems[0]
  # prepare_videos' input lists too (folders relative to the list's directory).
  listed.write_bytes(b"\xef\xbb\xbftrain/v0 2 0\r\n\r\ntrain/v1 2 1 \r\n")
  entries = annotations.read_frame_list(str(listed))
  assert [(e.key, e.label, e.error) for e in entries] == [("train/v0", 0, ""), ("train/v1", 1, "")]
  lines = textlist.read_lines(str(listed))
  assert lines == [(1, "train/v0 2 0"), (3, "train/v1 2 1")]


# --- 6a. Absurd frame shapes --------------------------------------------------------------------


def test_absurd_aspect_ratios_are_skipped_with_their_reason(tmp_path):
  make_clip(tmp_path / "v" / "a" / "strip.mp4", num_frames=2, fps=25, height=16, width=4000)
  make_clip(tmp_path / "v" / "a" / "tall.mp4", num_frames=2, fps=25, height=144, width=16)
  make_clip(tmp_path / "v" / "a" / "wide.mp4", num_frames=2, fps=25, height=16, width=128)  # 8:1
  summary = run(tmp_path / "v", tmp_path / "out", short_side=32, max_frames=1)
  reasons = {f.key: f.reason for f in summary.failures}
  assert sorted(reasons) == ["a/strip.mp4", "a/tall.mp4"]
  assert reasons["a/strip.mp4"] == ("frames of 4000x16 pixels (250.0:1) are beyond the aspect "
                                    "ratio limit of 8:1 (video.MAX_ASPECT_RATIO)")
  assert "16x144 pixels (9.0:1)" in reasons["a/tall.mp4"]
  tsv = (tmp_path / "out" / "train.failures.tsv").read_text().splitlines()
  assert len(tsv) == 3 and any(line.startswith("a/strip.mp4\t") and "aspect ratio" in line
                               for line in tsv)
  assert read_split(tmp_path / "out", "train")["a/wide.mp4"]["frames"].shape == (1, 32, 256, 3)


def test_frame_folders_of_absurd_shape_are_skipped_too(tmp_path):
  for name, shape in (("strip", (8, 400)), ("fine", (16, 24))):
    os.makedirs(tmp_path / "in" / name)
    data = tf.io.encode_png(np.zeros(shape + (3,), np.uint8)).numpy()
    (tmp_path / "in" / name / "img_00001.png").write_bytes(data)
  (tmp_path / "list.txt").write_text("in/strip 1 0\nin/fine 1 0\n")
  summary = run(tmp_path / "list.txt", tmp_path / "out", short_side=0)
  assert summary.videos_written == 1
  assert [(f.key, f.reason) for f in summary.failures] == [
      ("in/strip", "frames of 400x8 pixels (50.0:1) are beyond the aspect ratio limit of 8:1 "
                   "(video.MAX_ASPECT_RATIO)")]


# --- 13a. Frame-list lines stay inside the dataset root -----------------------------------------


def test_prepare_videos_input_lists_stay_inside_their_root(tmp_path):
  """The issue's '../../../../etc' in a list prepare_videos reads: one failure naming the line,
  not a look inside /etc, and the good lines prepared."""
  root = tmp_path / "extracted"
  ff.write_video(str(root), "a/v0", 0, num_frames=3)
  ff.write_video(str(root), "a/v1", 1, num_frames=3)
  listed = tmp_path / "lists" / "train.txt"
  ff.write_list_lines(str(listed), ["a/v0 3 0", "../../../../etc 3 1", "/etc 3 1",
                                    "a/../../extracted/a/v1 3 1", "a/x/../v1 3 1"])
  summary = run(listed, tmp_path / "out", video_root=str(root), short_side=0)
  assert summary.videos_total == 5 and summary.videos_written == 2
  assert {f.key: f.reason for f in summary.failures} == {
      folder: f"{listed} line {n}: folder {folder!r} is not a relative path inside {root}"
      for n, folder in ((2, "../../../../etc"), (3, "/etc"), (4, "a/../../extracted/a/v1"))}
  assert "no image files" not in summary.format()


def test_frame_list_lines_cannot_leave_the_root(tmp_path):
  """The issue's line, in SPLIT.txt and in a list kept elsewhere (config.data.train_list, the
  reference's absolute list paths): the folders are always under config.data.path."""
  root, elsewhere = tmp_path / "root", tmp_path / "lists"
  ff.write(str(root), "train", num_videos=2, num_frames=4)
  outside = tmp_path / "outside"
  ff.write_video(str(outside), "v", 7, num_frames=4)
  os.symlink(outside / "v", root / "train" / "linked")
  lines = ["train/v0 4 0", "../../../../../../etc", "../../../../../../etc 4 0", "/etc 4 0",
           "train/../../outside/v 4 1", "train/linked/../v1 4 1", "train/linked 4 2"]
  for path in (frames.list_path(str(root), "train"), str(elsewhere / "train.txt")):
    ff.write_list_lines(path, lines)
    source = sources.frame_source(ff.data_config(str(root), train_list=path), "train")
    assert source.videos.folders == ("train/v0", "train/v1", "train/linked")
    assert [p.split(": ", 1)[0] for p in source.videos.problems] == [
        f"{path} line {n}" for n in (2, 3, 4, 5)]
    assert "expected 'folder num_frames label'" in source.videos.problems[0]
    for problem in source.videos.problems[1:]:
      assert "is not a relative path inside the dataset root" in problem
    assert [f.decode() for f in source._folders.numpy()] == [  # pylint: disable=protected-access
        f"{root}/train/v0/", f"{root}/train/v1/", f"{root}/train/linked/"]
  # A symlink the dataset holds is its own layout (e.g. frames on another disk): followed.
  opened = source.open({"video": tf.constant(2)})
  assert int(opened["error"]) == 0
  frame = tf.io.decode_jpeg(source.read(opened, tf.constant([0]))[0]).numpy()
  assert abs(frame[..., 0].mean() - ff.red(7)) < 3
