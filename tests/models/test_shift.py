"""The temporal shift's two forms (runs of slices, roll + select) agree bitwise, values and gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msca_jax.models import shift

SHAPE = (2, 4, 5, 6, 3)   # (batch, time, tokens, heads, head_dim)
PATTERNS = {
    "msca_head_1_of_6": shift.head_fold_offsets(6, 6)[None, :, None],
    "msca_head_2_of_6": shift.head_fold_offsets(6, 3)[None, :, None],
    "msca_head_all": shift.head_fold_offsets(6, 2)[None, :, None],
    "tokenshift_channels": shift.channel_fold_offsets(3, 3),
    "patch_interleave": shift.patch_interleave_offsets(5, 2)[:, None, None],
    "scattered_heads": np.array([1, -1, 0, 0, 1, 0], np.int8)[:, None],
    "two_axes": np.repeat(np.array([[1, 0, 0], [0, 0, -1]], np.int8), 3, axis=0),   # (heads, dim)
}


@pytest.mark.parametrize("boundary", shift.BOUNDARIES)
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_runs_and_roll_select_agree_bitwise(name, boundary):
  pattern = PATTERNS[name]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  w = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  fast = lambda x: shift.temporal_shift(x, pattern, boundary)
  general = lambda x: shift.roll_and_select(x, np.asarray(pattern), boundary)
  np.testing.assert_array_equal(np.asarray(fast(x)), np.asarray(general(x)))
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * w))(x)
  np.testing.assert_array_equal(np.asarray(grad(fast)), np.asarray(grad(general)))


def test_one_frame_reads_zeros_or_itself():
  x = jnp.ones((1, 1, 3, 4))
  pattern = shift.channel_fold_offsets(4, 4)   # [1, -1, 0, 0]
  np.testing.assert_array_equal(np.asarray(shift.temporal_shift(x, pattern, "zero"))[0, 0, 0], [0, 0, 1, 1])
  np.testing.assert_array_equal(np.asarray(shift.temporal_shift(x, pattern, "circular")), np.asarray(x))


def test_contiguous_folds_move_only_their_slices():
  """MSCA's head folds take the run form: only the moving heads are read, shifted and written
  back in place, forward and backward; nothing selects, rolls or concatenates all the heads."""
  x = jax.ShapeDtypeStruct((2, 8, 197, 12, 64), jnp.float32)
  pattern = shift.head_fold_offsets(12, 12)[None, :, None]
  f = lambda x: shift.temporal_shift(x, pattern, "zero")
  for text in (jax.jit(f).lower(x).as_text(),
               jax.jit(jax.grad(lambda x: jnp.sum(f(x) ** 2))).lower(x).as_text()):
    selects = re.findall(r"stablehlo\.select [^\n]*?tensor<([\dx]+)xf32>", text)
    assert selects and set(selects) == {"2x8x197x1x64"}       # the masks cover one head each way
    assert text.count("stablehlo.dynamic_update_slice") >= 2
    rolled = re.findall(r"stablehlo\.concatenate [^\n]*-> tensor<([\dx]+)xf32>", text)
    assert set(rolled) <= {"2x8x197x1x64"}                    # the roll of one head over time
    assert "2x8x197x12x64xi1" not in text
  assert shift._runs(jnp.zeros((2, 8, 197, 768)), shift.channel_fold_offsets(768, 4))[1] == [
      (0, 192, 1), (192, 384, -1), (384, 768, 0)]
  # The patch-axis interleave has one run per patch: the general form.
  assert shift._runs(jnp.zeros((2, 8, 197, 12, 64)),
                     shift.patch_interleave_offsets(197, 4)[:, None, None]) is None
