"""Checkpoints restore onto other meshes, keep the input-stream state, and survive interrupted saves."""

import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from msca_jax.data.pipeline import StreamState
from msca_jax.train import checkpoint as ckpt_lib
from msca_jax.train import mesh as mesh_lib
from msca_jax.train import state as state_lib
from tests import helpers


def _setup(shape, devices):
  cfg = mesh_lib.mesh_config()
  cfg.shape = ml_collections.ConfigDict(shape)
  mesh = mesh_lib.make_mesh(cfg, devices)
  rules = mesh_lib.rules(cfg)
  model = helpers.small_model()
  tx = optax.adamw(1e-3)
  clip = jax.ShapeDtypeStruct((2, 2, 32, 32, 3), jnp.float32)
  return model, tx, clip, mesh, rules


def test_save_on_one_mesh_restore_on_others(tmp_path):
  model, tx, clip, mesh, rules = _setup(dict(data=2, fsdp=4, model=1), jax.devices())
  state, _ = state_lib.create(model, tx, clip, mesh, rules, jax.random.key(0))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), save_interval_steps=1)
  # A record stream's position carries its epoch above bit 32 (sources.EPOCH_STRIDE).
  stream = StreamState(position=3 * 2**32 + 1234, skipped=(1, 0, 2, 0, 5, 0))
  assert checkpointer.save(7, state, ckpt_lib.streams_array(stream, mesh), {"step": 7, "note": "x"})
  checkpointer.close()

  for shape, devices in [(dict(data=1, fsdp=1, model=1), jax.devices()[:1]),
                         (dict(data=2, fsdp=1, model=4), jax.devices())]:
    model, tx, clip, mesh, rules = _setup(shape, devices)
    abstract, shardings = state_lib.abstract_state(model, tx, clip, mesh, rules)
    reader = ckpt_lib.Checkpointer(str(tmp_path), save_interval_steps=1)
    assert reader.latest_step() == 7
    restored, streams, metadata = reader.restore(7, abstract, mesh)
    reader.close()
    chex.assert_trees_all_close(jax.device_get(restored), jax.device_get(state))
    kernel = restored.params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
    assert kernel.sharding == shardings.params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
    assert streams == [stream] and metadata == {"step": 7, "note": "x"}


def test_stream_rows_without_column_names_read_as_position_then_four_reasons():
  # Checkpoints written before the columns were named: [position, 4 skip counts]; newer reasons 0.
  state = ckpt_lib._stream_state(np.array([77, 1, 2, 3, 4], np.int64), None)
  assert state == StreamState(position=77, skipped=(1, 2, 3, 4, 0, 0))
  named = ckpt_lib._stream_state(np.array([1, 5, 9], np.int64), ["position_hi", "position_lo", "no_frames"])
  assert named.position == 2**31 + 5 and named.skipped_by_reason()["no_frames"] == 9


def test_an_unfinished_save_is_not_the_latest(tmp_path):
  model, tx, clip, mesh, rules = _setup(dict(data=1, fsdp=1, model=1), jax.devices()[:1])
  state, _ = state_lib.create(model, tx, clip, mesh, rules, jax.random.key(0))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), save_interval_steps=5, max_to_keep=2)
  streams = ckpt_lib.streams_array(StreamState(), mesh)
  assert checkpointer.save(5, state, streams, {}) and not checkpointer.save(6, state, streams, {})
  checkpointer.close()
  # What a kill in the middle of writing step 10 leaves behind: orbax's temporary directory.
  os.makedirs(tmp_path / "10.orbax-checkpoint-tmp-1234" / "state")
  (tmp_path / "10.orbax-checkpoint-tmp-1234" / "state" / "partial").write_bytes(b"\0" * 100)
  reader = ckpt_lib.Checkpointer(str(tmp_path), save_interval_steps=5)
  assert reader.latest_step() == 5
  reader.close()


def test_stop_signal_turns_sigterm_into_a_flag():
  import signal
  stop = ckpt_lib.StopSignal()
  try:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.signal_name == "SIGTERM"
  finally:
    stop.restore_handlers()
