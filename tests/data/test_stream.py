"""data/stream.py: the batch layout, host/device split, padding, resume state and process rows."""


import numpy as np
import pytest

from msca_jax.data import pipeline, sources, stream
from msca_jax.data.errors import SKIP_REASONS
from msca_jax.train import mesh as mesh_lib
from tests.data import shards


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("shards"))
  shards.write(directory, "train", num_videos=9, num_shards=3)
  shards.write(directory, "validation", num_videos=7, num_shards=2)
  return directory


@pytest.mark.parametrize("mixing", [False, True])
def test_training_batches_follow_the_declared_layout(dataset_dir, mixing):
  data = shards.data_config(dataset_dir, **(dict(mixup_alpha=0.4) if mixing else {}))
  source = sources.dmvr_source(dataset_dir, "train")
  train = stream.TrainStream(source, data, batch_size=4, seed=0)
  batch = next(train)
  for field in pipeline.train_fields(data):
    side = batch.device if field.device else batch.host
    assert side[field.name].shape == (4,) + field.shape
    assert side[field.name].dtype == np.dtype(field.dtype)
  assert set(batch.device) == {"video", "label"} | ({"label_mix", "mix_weight"} if mixing else set())
  assert set(batch.host) == {"index", "skipped"}
  assert batch.device["video"].dtype == np.uint8
  # The state is the one after this batch: a stream started from it continues the same stream.
  after = next(train)
  resumed = next(stream.TrainStream(source, data, batch_size=4, seed=0,
                                    state=pipeline.StreamState.after(
                                        {**batch.host})))
  np.testing.assert_array_equal(resumed.device["video"], after.device["video"])
  np.testing.assert_array_equal(resumed.host["index"], after.host["index"])
  assert train.state == pipeline.StreamState.after({**after.host})


def test_evaluation_batches_pad_and_mask_every_video_once(dataset_dir):
  data = shards.data_config(dataset_dir)
  source = sources.dmvr_source(dataset_dir, "validation")
  videos = stream.EvalStream(source, data, batch_size=3, num_clips=2, num_crops=1)
  batches = list(videos)
  assert len(batches) == videos.num_batches == 3
  assert sum(int(b.device["mask"].sum()) for b in batches) == 7
  keys = [k for b in batches for k, m in zip(b.host["key"], b.device["mask"]) if m]
  assert sorted(keys) == sorted(f"v{i}".encode() for i in range(7))
  assert batches[0].device["video"].shape == (3, 2, 4, 16, 16, 3)
  assert set(batches[0].host) == {"error", "index", "key"}
  assert videos.gather_host(batches[0].host) is batches[0].host  # one process: as it is


def test_padding_batch_has_the_layout_and_masks_everything():
  data = shards.data_config("unused")
  blank = stream.zeros(pipeline.eval_fields(data, 3), 5)
  assert blank.device["video"].shape == (5, 3, 4, 16, 16, 3) and not blank.device["mask"].any()
  assert list(blank.host["key"]) == [b""] * 5


def test_a_batch_that_breaks_the_layout_names_the_field():
  data = shards.data_config("unused")
  fields = pipeline.train_fields(data)
  good = {f.name: np.zeros((2,) + f.shape, f.dtype) for f in fields}
  stream._split(fields, good, 2, "training batch")
  with pytest.raises(AssertionError, match="'video'"):
    stream._split(fields, dict(good, video=np.zeros((2, 4, 16, 16, 3), np.float32)), 2, "training batch")
  with pytest.raises(AssertionError, match="extra"):
    stream._split(fields, dict(good, extra=np.zeros(2)), 2, "training batch")


def test_resume_state_with_the_same_and_another_process_count():
  class Positions:
    random_access = True
    resume_position = sources.MemorySource.resume_position
  saved = [pipeline.StreamState(10, (1,) + (0,) * (len(SKIP_REASONS) - 1)), pipeline.StreamState(9)]
  assert stream.resume_state(Positions(), saved, 1, 2) is saved[1]
  # Two processes read global positions 2p and 2p + 1: 0..18 were read by both (min(20, 19)).
  assert [stream.resume_state(Positions(), saved, i, 3).position for i in range(3)] == [7, 6, 6]
  assert stream.resume_state(Positions(), saved, 0, 1).position == 19


def test_keys_survive_the_fixed_width_encoding():
  keys = np.array([b"a", b"", "é/x".encode(), b"k" * 300], dtype=object)
  back = stream.decode_keys(stream.encode_keys(keys))
  assert list(back[:3]) == list(keys[:3]) and back[3] == b"k" * stream.KEY_BYTES


def test_process_rows_follow_the_batch_sharding():
  mesh = mesh_lib.make_mesh(mesh_lib.mesh_config())
  rows = mesh_lib.process_rows(mesh, 16)
  np.testing.assert_array_equal(rows, np.arange(16)[None])  # one process holds every row
