"""Frame folders, the random-access source: exact and constant-time resume (every source), bytes
read per clip, epochs split over processes, bad inputs counted once, the reference layout."""

import gc
import itertools
import os
import re

import numpy as np
import pytest

from msca_jax.data import dmvr, frames, pipeline, sources, stream
from msca_jax.data.errors import SKIP_REASONS, DataError
from tests.data import frame_folders as ff
from tests.data import shards

REASON = {name: i + 1 for i, name in enumerate(SKIP_REASONS)}
N = 10          # good videos in the `folders` training list
FRAMES = 12     # frames per video (36 x 48); clips are 4 frames at stride 1, 16 px
MIXING = dict(mixup_alpha=0.5, cutmix_alpha=1.0)


# ---------------------------------------------------------------------------------------------
# Datasets, written once per module.

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """ROOT/train.txt: N good videos; ROOT/with_bad.txt: the same and one whose frame 1 is missing."""
  root = str(tmp_path_factory.mktemp("folders"))
  rows = ff.write(root, "train", num_videos=N, num_frames=FRAMES)
  ff.write_video(root, "train/missing", 50, num_frames=4)   # every 4-frame clip needs frame 1
  os.remove(os.path.join(root, "train", "missing", frames.FrameNames().name(1)))
  ff.write_list_lines(os.path.join(root, "with_bad.txt"),
                      [f"{f} {n} {l}" for f, n, l in rows[:4]] + ["train/missing 4 1"]
                      + [f"{f} {n} {l}" for f, n, l in rows[4:]])
  return root


def _frames_stream(folders, **overrides):
  data = ff.data_config(folders, train_list=os.path.join(folders, "with_bad.txt"), **overrides)
  return sources.make_source(data, "train"), data


def _dmvr_stream(directory, **overrides):
  return sources.dmvr_source(directory, "train"), shards.data_config(directory, **overrides)


def _tfds_stream(data_dir, **overrides):
  data = shards.data_config(data_dir, source="tfds", tfds_name="kinetics/tiny2", **overrides)
  return sources.make_source(data, "train"), data


def _synthetic_stream(directory, **overrides):
  data = shards.data_config("", source="synthetic", **overrides)
  data.synthetic.update(dict(seed=0, train_size=12, eval_size=4, video_frames=6, size=16,
                             dir=directory))
  return sources.make_source(data, "train"), data


@pytest.fixture(scope="module")
def frames_stream(folders):
  return lambda **overrides: _frames_stream(folders, **overrides)


def _dmvr_example(i, label=None):
  label = i % 3 if label is None else label
  return dmvr.make_example(shards.jpegs(shards.video(i)), label, "", f"v{i}")


@pytest.fixture(scope="module")
def dmvr_stream(tmp_path_factory):
  """13 DMVR records in 3 shards, one of them with a label out of range."""
  directory = str(tmp_path_factory.mktemp("shards"))
  records = [_dmvr_example(i) for i in range(12)]
  records.insert(5, _dmvr_example(98, label=7))
  shards.write(directory, "train", records=records, num_shards=3)
  return lambda **overrides: _dmvr_stream(directory, **overrides)


@pytest.fixture(scope="module")
def tfds_stream(tmp_path_factory):
  """The 2-class Kinetics TFDS dataset of test_kinetics_tfds, 3 training videos."""
  from msca_jax.data import kinetics
  from tests.data.test_kinetics_tfds import HEADER, TINY, _row, _write_videos
  root = tmp_path_factory.mktemp("kinetics")
  manual, data_dir = str(root / "manual"), str(root / "tfds")
  _write_videos(manual, ["aaa", "bbb", "ccc", "fff"])
  with open(os.path.join(manual, "train.csv"), "w") as f:
    f.write(HEADER + _row("riding a bike", "aaa") + _row("abseiling", "bbb") + _row("abseiling", "ccc"))
  with open(os.path.join(manual, "validate.csv"), "w") as f:
    f.write(HEADER + _row("riding a bike", "fff", "val"))
  kinetics.prepare(manual, data_dir, kinetics.KineticsConfig(**TINY), workers=1)
  return lambda **overrides: _tfds_stream(data_dir, **overrides)


@pytest.fixture(scope="module")
def synthetic_stream(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("synthetic"))
  return lambda **overrides: _synthetic_stream(directory, **overrides)


def _train(source, data, n, *, seed=5, batch_size=4, state=pipeline.StreamState(), **kwargs):
  """n batches of a TrainStream as flat dicts, each with the stream's state after it."""
  train = stream.TrainStream(source, data, batch_size=batch_size, seed=seed, state=state, **kwargs)
  out = []
  for batch in itertools.islice(train, n):
    out.append((dict(batch.device, **batch.host), train.state))
  return out


def _epoch(source, position):
  if source.random_access:
    return position // source.num_records
  return position // sources.EPOCH_STRIDE


# ---------------------------------------------------------------------------------------------
# Exact resume, every source.

@pytest.mark.parametrize("mixing", [False, True], ids=["plain", "mixup"])
@pytest.mark.parametrize("kind", ["frames", "dmvr", "tfds", "synthetic"])
def test_resumed_stream_equals_the_uninterrupted_one(request, kind, mixing):
  source, data = request.getfixturevalue(f"{kind}_stream")(**(MIXING if mixing else {}))
  batch_size = 2 if kind == "tfds" else 4   # TFDS: 3 videos an epoch
  first = _train(source, data, 6, batch_size=batch_size)
  resumes = (1, 5) if mixing else (1, 4)    # in the first epoch, and after it
  for k in resumes:
    state = first[k - 1][1]
    resumed = _train(source, data, len(first) - k, batch_size=batch_size, state=state)
    assert len(resumed) == len(first) - k
    for j, ((a, a_state), (b, b_state)) in enumerate(zip(first[k:], resumed)):
      assert sorted(a) == sorted(b)
      assert ("label_mix" in a) == mixing
      for field in a:   # video, label, index, skipped (and label_mix, mix_weight)
        np.testing.assert_array_equal(a[field], b[field], err_msg=f"{kind}: resumed after batch "
                                      f"{k} at {state}, batch {k + j} field {field!r}")
      assert a_state == b_state
  states = [first[k - 1][1] for k in resumes]
  # The resumes start in the first epoch and in later ones, and the compared batches cross epochs.
  assert _epoch(source, states[0].position) == 0 and _epoch(source, states[-1].position) >= 1
  epochs = {_epoch(source, int(i)) for b, _ in first[1:] for i in b["index"]}
  assert len(epochs) >= 2
  bad = {"frames": "missing_frames", "dmvr": "label_out_of_range"}.get(kind)
  if bad:   # one bad video each: the skip counts carry over too
    assert states[-1].skipped_by_reason()[bad] >= 1
    assert sum(states[-1].skipped) == states[-1].skipped_by_reason()[bad]
  else:
    assert not any(first[-1][1].skipped)


def test_resume_at_any_position_is_the_same_elements(folders):
  """Without batches: from position p the elements are the uninterrupted stream's from p."""
  source, data = _frames_stream(folders, color_prob=1.0)
  whole = [b for b, _ in _train(source, data, 20, batch_size=1, seed=2)]
  by_index = {int(b["index"][0]): b for b in whole}
  for start in (3, 11):   # mid-epoch, and the first position of the second (N + 1 = 11 videos)
    state = pipeline.StreamState(position=start)
    tail = [b for b, _ in _train(source, data, 6, batch_size=1, seed=2, state=state)]
    for b in tail:
      a = by_index[int(b["index"][0])]
      np.testing.assert_array_equal(a["video"], b["video"])
      np.testing.assert_array_equal(a["label"], b["label"])
    assert [int(b["index"][0]) for b in tail] == sorted(i for i in by_index if i >= start)[:6]


# ---------------------------------------------------------------------------------------------
# Bytes read: constant-time resume, a clip reads only its frames.

CLIP_FRAMES = 4
SAME_SIZE_VIDEOS, SAME_SIZE_FRAMES = 4, 30


@pytest.fixture(scope="module")
def same_size(tmp_path_factory):
  """4 videos of 30 frames whose files all hold the same textured JPEG: every frame costs the
  same bytes, so the bytes a stream reads say how many frame files it read."""
  root = str(tmp_path_factory.mktemp("same_size"))
  jpeg, = ff.jpegs(ff.video(0, num_frames=1, texture=127))
  rows = []
  for i in range(SAME_SIZE_VIDEOS):
    frames.write_frames(root, f"train/v{i}", [jpeg] * SAME_SIZE_FRAMES)
    rows.append((f"train/v{i}", SAME_SIZE_FRAMES, i % 3))
  ff.write(root, "train", rows=rows)
  data = ff.data_config(root)
  return sources.make_source(data, "train"), data, len(jpeg)


def _bytes_read(ds):
  """(bytes this process read while iterating `ds` to its end, the batches)."""
  gc.collect()   # abandoned iterators of earlier tests stop reading
  before = ff.rchar()
  batches = list(pipeline.as_numpy(ds))
  return ff.rchar() - before, batches


def test_resume_far_away_reads_no_more_than_at_the_start(same_size):
  source, data, frame_bytes = same_size
  n = SAME_SIZE_VIDEOS

  def first_batch(position):
    # The stream that ends with the epoch holding `position`: from a batch-aligned position it is
    # exactly one batch (one epoch of n videos), so read-ahead cannot blur the count.
    ds = pipeline.train_dataset(source, data, batch_size=n, seed=0, num_epochs=position // n + 1,
                                state=pipeline.StreamState(position=position))
    read, batches = _bytes_read(ds)
    assert len(batches) == 1 and batches[0]["index"].tolist() == list(range(position, position + n))
    assert sorted(batches[0]["label"]) == sorted(i % 3 for i in range(n))
    return read

  first_batch(0)   # warm-up: lazy imports and the like are not the stream's reads
  at_start = first_batch(0)
  clip_bytes = n * CLIP_FRAMES * frame_bytes
  tolerance = 1024   # about half a frame file (reading /proc/self/io itself counts ~150 bytes)
  assert clip_bytes <= at_start <= clip_bytes + tolerance
  assert first_batch(10**6) <= at_start + tolerance


def test_a_training_clip_reads_only_its_frames(same_size):
  source, data, frame_bytes = same_size
  epochs = 3
  ds = pipeline.train_dataset(source, data, batch_size=1, seed=1, num_epochs=epochs)
  read, batches = _bytes_read(ds)
  clips = epochs * SAME_SIZE_VIDEOS
  assert len(batches) == clips
  # Each clip decodes 4 distinct frames (stride 1, 30 frames): their bytes, not the video's 30.
  decoded = clips * CLIP_FRAMES * frame_bytes
  assert decoded <= read <= 2 * decoded, (read, decoded)
  assert read < clips * SAME_SIZE_FRAMES * frame_bytes / 3


# ---------------------------------------------------------------------------------------------
# Epochs: permutations, split over processes, clip seeds from the global position.

def _records(source, **kwargs):
  return list(source.train_records(**kwargs).as_numpy_iterator())


@pytest.fixture(scope="module")
def clean(folders):
  data = ff.data_config(folders)
  source = sources.make_source(data, "train")
  assert source.num_records == N and not source.videos.problems
  return source, data


def test_each_epoch_is_a_permutation_and_epochs_and_seeds_differ(clean):
  source, _ = clean
  epochs = 4
  records = _records(source, seed=0, process_index=0, process_count=1, start=0, num_epochs=epochs)
  assert [int(r["index"]) for r in records] == list(range(epochs * N))
  assert [int(r["position"]) for r in records] == list(range(epochs * N))
  orders = [[int(r["video"]) for r in records[e * N:(e + 1) * N]] for e in range(epochs)]
  for order in orders:
    assert sorted(order) == list(range(N))
  assert len({tuple(o) for o in orders}) == epochs
  other = _records(source, seed=1, process_index=0, process_count=1, start=0, num_epochs=epochs)
  other_orders = [[int(r["video"]) for r in other[e * N:(e + 1) * N]] for e in range(epochs)]
  for order in other_orders:
    assert sorted(order) == list(range(N))
  assert all(a != b for a, b in zip(orders, other_orders))
  # Constant-time start: position p is the same video whether the stream starts at 0 or at p.
  tail = _records(source, seed=0, process_index=0, process_count=1, start=23, num_epochs=epochs)
  assert [int(r["video"]) for r in tail] == [int(r["video"]) for r in records[23:]]


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("epochs", [2, 3])
def test_processes_split_every_epoch_disjointly_and_completely(clean, count, epochs):
  source, _ = clean
  single = {int(r["position"]): int(r["video"]) for r in _records(
      source, seed=0, process_index=0, process_count=1, start=0, num_epochs=epochs)}
  seen = {}
  for i in range(count):
    records = _records(source, seed=0, process_index=i, process_count=count, start=0,
                       num_epochs=epochs)
    positions = [int(r["position"]) for r in records]
    assert positions == [p * count + i for p in range(len(records))]
    assert [int(r["index"]) for r in records] == list(range(len(records)))
    for r in records:
      assert int(r["position"]) not in seen   # disjoint
      seen[int(r["position"])] = int(r["video"])
  assert sorted(seen) == list(range(epochs * N))   # complete: every epoch, nothing past the last
  for e in range(epochs):
    assert sorted(seen[g] for g in range(e * N, (e + 1) * N)) == list(range(N))
  assert seen == single   # the same global order whatever the number of processes
  # A run of `count` processes stopped at local positions (4, 4, ...) continues on 3 processes
  # from the first global position not read by all: nothing skipped.
  done = min(4 * count + i for i in range(count))
  starts = [source.resume_position([4] * count, i, 3) for i in range(3)]
  assert sorted(p * 3 + i for i, p in enumerate(starts)) == [done, done + 1, done + 2]


def test_a_clip_depends_on_its_global_position_only(clean):
  source, data = clean
  one = [b for b, _ in _train(source, data, 4, batch_size=2, seed=3)]
  two = [[b for b, _ in _train(source, data, 2, batch_size=2, seed=3, process_index=i,
                               process_count=2)] for i in range(2)]
  by_global = {}
  for i, batches in enumerate(two):
    for b in batches:
      for j in range(2):
        by_global[int(b["index"][j]) * 2 + i] = (b["video"][j], b["label"][j])
  assert sorted(by_global) == list(range(8))
  for b in one:
    for j in range(2):
      video, label = by_global[int(b["index"][j])]
      np.testing.assert_array_equal(b["video"][j], video)
      assert b["label"][j] == label


# ---------------------------------------------------------------------------------------------
# Bad inputs: skipped and counted in training, kept with mask 0 and a code in evaluation.

BAD = {   # folder -> (list line, expected reason or None for a good video)
    "train/g0": ("train/g0 12 0", None),
    "train/missing": ("train/missing 4 0", "missing_frames"),
    "train/g1": ("train/g1 12 1", None),
    "train/empty": ("train/empty 12 1", "frame_count_mismatch"),
    "train/long": ("train/long 14 2", "frame_count_mismatch"),      # the folder has 12 frames
    "train/g2": ("train/g2 12 2", None),
    "train/short": ("train/short 10 0", "frame_count_mismatch"),    # the folder has 12 frames
    "train/label": ("train/label 12 7", "label_out_of_range"),
    "train/g3": ("train/g3 12 0", None),
    "train/notjpeg": ("train/notjpeg 4 2", "undecodable"),
    "train/zero": ("train/zero 0 1", "no_frames"),
    "train/g4": ("train/g4 12 1", None),
}
BAD_LINES = {   # skipped when the list is read: line -> what the problem says
    "train/g1 12": "expected 'folder num_frames label'",
    "train/g1 twelve 1": "expected 'folder num_frames label'",
    "../../etc 12 0": "'../../etc' is not a relative path inside the dataset root",
    "/etc 12 0": "'/etc' is not a relative path inside the dataset root",
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bad"))
  for i, folder in enumerate(["train/g0", "train/g1", "train/g2", "train/g3", "train/g4",
                              "train/long", "train/short", "train/label"]):
    ff.write_video(root, folder, i, FRAMES)
  ff.write_video(root, "train/missing", 20, num_frames=4)   # every 4-frame clip reads all 4
  os.remove(os.path.join(root, "train", "missing", frames.FrameNames().name(1)))
  ff.write_video(root, "train/notjpeg", 21, num_frames=4)
  with open(os.path.join(root, "train", "notjpeg", frames.FrameNames().name(2)), "wb") as f:
    f.write(b"not a jpeg at all")
  os.makedirs(os.path.join(root, "train", "empty"))
  os.makedirs(os.path.join(root, "train", "zero"))
  lines = [line for line, _ in BAD.values()]
  for k, line in enumerate(BAD_LINES):   # interleaved with the good lines
    lines.insert(2 + 3 * k, line)
  ff.write(root, "train", rows=[])
  ff.write_list_lines(frames.list_path(root, "train"), lines)
  data = ff.data_config(root)
  return sources.make_source(data, "train"), data, lines


def test_bad_list_lines_are_skipped_when_the_list_is_read(bad):
  source, _, lines = bad
  assert source.videos.folders == tuple(BAD)
  assert len(source.videos.problems) == len(BAD_LINES)
  for problem, (line, what) in zip(source.videos.problems, BAD_LINES.items()):
    assert f"line {lines.index(line) + 1}:" in problem and what in problem, problem


def test_bad_videos_are_kept_with_their_code_in_evaluation(bad):
  source, data, _ = bad
  batches = list(pipeline.as_numpy(pipeline.eval_dataset(source, data, batch_size=5, num_clips=2,
                                                         num_crops=1)))
  cat = lambda k: np.concatenate([b[k] for b in batches])
  real = cat("index") >= 0
  index, error, mask = cat("index")[real], cat("error")[real], cat("mask")[real]
  assert sorted(index) == list(range(len(BAD)))   # every listed video exactly once
  folders = list(BAD)
  for i, code, m in zip(index, error, mask):
    reason = BAD[folders[i]][1]
    assert code == (REASON[reason] if reason else 0), folders[i]
    assert m == (reason is None)
  keys = cat("key")[real][mask == 1]
  assert sorted(keys) == sorted(f.encode() for f, (_, r) in BAD.items() if r is None)
  expected = {r: sum(reason == r for _, reason in BAD.values()) for r in SKIP_REASONS}
  assert pipeline.skip_summary(error) == expected
  videos = cat("video")[real][mask == 1]
  assert videos.dtype == np.uint8 and (videos.reshape(len(videos), -1).std(axis=1) > 0).all()
  assert not cat("mask")[~real].any()


def test_bad_videos_are_skipped_and_counted_in_training(bad):
  source, data, _ = bad
  epochs = 2
  order = [int(r["video"]) for r in _records(source, seed=0, process_index=0, process_count=1,
                                              start=0, num_epochs=epochs)]
  folders = list(BAD)
  reasons = [BAD[folders[v]][1] for v in order]
  train = stream.TrainStream(source, data, batch_size=1, seed=0, num_epochs=epochs)
  batches = list(train)
  good = [p for p, r in enumerate(reasons) if r is None]
  assert [int(b.host["index"][0]) for b in batches] == good   # every good video, each epoch
  for b in batches:
    p = int(b.host["index"][0])
    counts = [sum(r == reason for r in reasons[:p]) for reason in SKIP_REASONS]
    np.testing.assert_array_equal(b.host["skipped"][0], counts)   # every bad one so far, once
    assert int(b.device["label"][0]) == int(BAD[folders[order[p]]][0].split()[-1])
    assert b.device["video"].dtype == np.uint8 and b.device["video"].std() > 0
  # The state a checkpoint saves: the counts up to the last good video of the two epochs.
  last = good[-1]
  assert train.state.position == last + 1
  assert train.state.skipped_by_reason() == {
      reason: sum(r == reason for r in reasons[:last]) for reason in SKIP_REASONS}
  per_epoch = pipeline.skip_summary([REASON[r] for _, r in BAD.values() if r])
  for reason, n in per_epoch.items():   # the whole first epoch at least
    assert train.state.skipped_by_reason()[reason] >= (epochs - 1) * n
  assert sum(per_epoch.values()) == 7 and all(per_epoch[r] for r in SKIP_REASONS if r != "corrupt_shard")


# ---------------------------------------------------------------------------------------------
# The reference code's own layout.

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """videos/<class>/<name>/000000.jpg ..., a list elsewhere, no labels.txt, no manifest."""
  root = str(tmp_path_factory.mktemp("reference"))
  names = frames.FrameNames("{:06d}.jpg", 0)
  lines = []
  for i in range(3):
    folder = f"videos/class{i}/clip_{i}"
    ff.write_video(root, folder, i, FRAMES, names=names)
    lines.append(f"{folder} {FRAMES} {i}")
  list_file = os.path.join(root, "lists", "trainlist01.txt")
  ff.write_list_lines(list_file, lines)
  return root, list_file


def test_reference_layout_is_read_directly(reference):
  root, list_file = reference
  data = ff.data_config(root, train_list=list_file, frame_pattern="{:06d}.jpg",
                        frame_first_index=0, color_prob=0.0)
  source = sources.make_source(data, "train")
  assert source.class_names == ("0", "1", "2")
  assert sources.make_source(data, "train", num_classes=5).class_names == tuple("01234")
  assert source.decode.short_side == ff.HEIGHT   # read off the first frame
  assert not os.path.exists(os.path.join(root, "labels.txt"))
  batches = list(pipeline.as_numpy(pipeline.eval_dataset(source, data, batch_size=3, num_clips=1,
                                                          num_crops=1)))
  b, = batches
  np.testing.assert_array_equal(b["mask"], [1, 1, 1])
  np.testing.assert_array_equal(b["label"], [0, 1, 2])
  # The reference's clip starts at frame 0, which is the file 000000.jpg.
  mean = shards.pixels(b["video"][:, 0]).mean(axis=(2, 3))   # (video, frame, channel)
  np.testing.assert_allclose(mean[..., 0], [[ff.red(i)] * 4 for i in range(3)], atol=3)
  np.testing.assert_allclose(mean[..., 1], [[ff.green(t, FRAMES) for t in range(4)]] * 3, atol=3)
  t, = _train(source, data, 1, batch_size=3)
  assert t[0]["video"].shape == (3, 4, 16, 16, 3) and set(t[0]["label"]) <= {0, 1, 2}
  assert not t[0]["skipped"].any()


def test_a_wrong_frame_pattern_is_a_clear_error(reference):
  root, list_file = reference
  data = ff.data_config(root, train_list=list_file)   # img_{:05d}.jpg from 1: not these files
  expected = os.path.join(root, "videos", "class0", "clip_0", "img_00001.jpg")
  with pytest.raises(DataError, match=re.escape(expected) + " does not exist.*000000.jpg.*"
                                      "config.data.frame_pattern"):
    sources.make_source(data, "train")
  data = ff.data_config(root, train_list=list_file, frame_pattern="{:06d}.jpg", frame_first_index=1)
  for field, value in (("frame_pattern", "frames/{:06d}.jpg"), ("frame_pattern", "{:06d}{}.jpg"),
                       ("frame_first_index", 2)):
    data = ff.data_config(root, train_list=list_file, **{"frame_pattern": "{:06d}.jpg", field: value})
    with pytest.raises(DataError, match=f"config.data.{field}"):
      sources.make_source(data, "train")


def test_a_wrong_first_index_is_a_clear_error(reference):
  # With frame_first_index=1 on 0-based files, frame 0 would be 000001.jpg, which exists: without
  # this check every video would be skipped later as frame_count_mismatch.
  root, list_file = reference
  data = ff.data_config(root, train_list=list_file, frame_pattern="{:06d}.jpg", frame_first_index=1)
  with pytest.raises(DataError, match="frame_first_index"):
    sources.make_source(data, "train")


# ---------------------------------------------------------------------------------------------
# The reference clip positions reach the pipeline.

LONG = 250   # a 10 s Kinetics video at 25 fps: shorter than 8 x 32 = 256 frames


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("long"))
  ff.write_video(root, "validation/long", 0, LONG, texture=100)
  ff.write(root, "validation", rows=[("validation/long", LONG, 1)])
  ff.write(root, "train", rows=[("validation/long", LONG, 1)])
  return root


def _config(root, positions):
  return ff.data_config(root, num_frames=8, stride=32, clip_positions=positions, color_prob=0.0)


def test_reference_positions_reach_the_pipeline(long_video):
  names = frames.FrameNames()
  # 'centred' (the earlier default): 10 distinct clips, so 80 distinct frames are read.
  centred = _config(long_video, "centred")
  ds = pipeline.eval_dataset(sources.make_source(centred, "validation"), centred, batch_size=1,
                             num_clips=10, num_crops=1)
  read_centred, (c,) = _bytes_read(ds)   # also the warm-up of the measurement below
  starts = [1, 4, 6, 9, 11, 14, 16, 19, 21, 24]   # docs/sampling.md, F = 250
  indices = np.array(starts)[:, None] + 32 * np.arange(8)
  greens = shards.pixels(c["video"][0])[..., 1].mean(axis=(2, 3))   # (clip, frame)
  np.testing.assert_allclose(greens, indices, atol=3)
  assert read_centred >= ff.folder_bytes(long_video, "validation/long", names, indices)

  # 'reference' (the default): F = 250 <= 8 * 32, so every one of the 10 clips starts at frame 0.
  data = _config(long_video, "reference")
  assert ff.data_config(long_video).clip_positions == "reference"
  source = sources.make_source(data, "validation")
  read, (b,) = _bytes_read(pipeline.eval_dataset(source, data, batch_size=1, num_clips=10,
                                                 num_crops=1))
  views = b["video"][0]
  assert views.shape == (10, 8, 16, 16, 3)
  for view in views[1:]:
    np.testing.assert_array_equal(view, views[0])
  greens = shards.pixels(views[0])[..., 1].mean(axis=(1, 2))
  np.testing.assert_allclose(greens, 32 * np.arange(8), atol=3)
  # Each distinct frame is read once: 8 files, not 10 clips x 8.
  distinct = ff.folder_bytes(long_video, "validation/long", names, 32 * np.arange(8))
  assert distinct <= read <= distinct + 1024, (read, distinct)
  assert read_centred > 5 * distinct

  # Training: the reference's start range for F = 250 is {0}; every clip is frames 0, 32, ... 224.
  source = sources.make_source(data, "train")
  batch, = [x for x, _ in _train(source, data, 1, batch_size=3)]
  greens = shards.pixels(batch["video"])[..., 1].mean(axis=(2, 3))
  np.testing.assert_allclose(greens, np.tile(32 * np.arange(8), (3, 1)), atol=3)


def test_a_bad_first_video_is_one_skipped_video_not_a_start_up_error(tmp_path):
  # The start-up check of the frame names looks at the first listed folder; when that folder is
  # merely bad (empty, or missing its first frame) the run goes on and counts it.
  root = str(tmp_path)
  ff.write_video(root, "train/v1", 1)
  ff.write_video(root, "train/v2", 2)
  os.makedirs(os.path.join(root, "train", "empty"))
  os.remove(os.path.join(root, "train", "v2", "img_00001.jpg"))
  ff.write(root, "train", rows=[("train/empty", 12, 0), ("train/v2", 12, 2), ("train/v1", 12, 1)])
  data = ff.data_config(root)
  source = sources.make_source(data, "train")
  batches = list(pipeline.as_numpy(pipeline.eval_dataset(source, data, batch_size=3, num_clips=1,
                                                         num_crops=1)))
  reasons = {key.decode(): SKIP_REASONS[e - 1] if e else "" for b in batches
             for key, e in zip(b["key"], b["error"]) if key}
  assert reasons == {"train/empty": "frame_count_mismatch", "train/v2": "missing_frames",
                     "train/v1": ""}
