"""The device half of the training augmentation equals the host's TensorFlow chain (augment.py).

Measured on CPU (float32), against TF 2.21's CPU kernels:
- resize weights: bitwise equal to ResizeBicubic's (every window 1..256 -> 224 was checked);
- resize: <= 4e-7 in [0, 1] units (summation order only; the exact Keys kernel instead of TF's
  1024-step table would be ~8e-4 off);
- rgb_to_hsv, hsv_to_rgb, adjust_saturation, adjust_hue, gamma: <= ~8e-7;
- the whole train chain: ~2.5e-6 at 224 px (gamma < 1 magnifies the resize's ulps near 0).
The tolerances below leave a margin over those for other CPUs and XLA versions.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from msca_jax.data import device_augment as da

RESIZE_ATOL = 2e-6
COLOR_ATOL = 2e-6
CHAIN_ATOL = 1e-5

S, P, T = 16, 40, 2
WINDOWS = (7, 16, 23, 32)


def _tf_weights(window, size):
  """TF's own row weights: resizing an identity image along one axis returns them exactly."""
  eye = np.eye(window, dtype=np.float32)[..., None]
  return tf.image.resize(eye, (size, window), method="bicubic").numpy()[..., 0]


def _padded_batch(rng, windows, padded=P, frames=T):
  video = np.zeros((len(windows), frames, padded, padded, 3), np.uint8)
  for i, w in enumerate(windows):
    video[i, :, :w, :w] = rng.integers(0, 256, (frames, w, w, 3))
  return video


def _host_chain(window_u8, flip, color, size):
  """augment.train_clip after decoding, with the flip and colour values given."""
  v = tf.image.resize(tf.cast(window_u8, tf.float32) / 255.0, (size, size), method="bicubic")
  v = tf.clip_by_value(v, 0.0, 1.0)
  if flip:
    v = tf.reverse(v, [2])
  return _host_colour(v, color)


def _host_colour(v, color):
  """augment.py's colour changes, each applied when its value is not the identity."""
  brightness, saturation, gamma, hue = (float(c) for c in color)
  if brightness != 1:
    v = tf.clip_by_value(v * brightness, 0.0, 1.0)
  if saturation != 1:
    v = tf.clip_by_value(tf.image.adjust_saturation(v, saturation), 0.0, 1.0)
  if gamma != 1:
    v = tf.image.adjust_gamma(v, gamma)
  if hue != 0:
    v = tf.image.adjust_hue(v, hue)
  return v.numpy()


def _colours(seed=0):
  """(1, N, 3) float32 in [0, 1]: random, 8-bit, greys, primaries and secondaries, near hue wrap."""
  rng = np.random.default_rng(seed)
  ulp = np.float32(np.spacing(np.float32(0.5)))
  near_wrap = np.stack([np.ones(64), np.full(64, 0.5), 0.5 + np.arange(-32, 32) * ulp], 1)
  near_wrap_small = np.stack([np.full(64, 0.3), np.full(64, 0.01),
                              np.float32(0.01) + np.arange(-32, 32) * np.spacing(np.float32(0.01))], 1)
  parts = [
      rng.random((4000, 3)),
      rng.integers(0, 256, (2000, 3)) / 255,
      np.repeat(rng.random((200, 1)), 3, axis=1),
      [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 1]],
      near_wrap, near_wrap_small,
      [[1, 0, 1e-7], [1, 1e-7, 0], [1e-7, 0, 1]],
  ]
  return np.concatenate([np.asarray(p, np.float32) for p in parts])[None].astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Resize

_weights = jax.jit(da.resize_weights, static_argnums=(1, 2))


@pytest.mark.parametrize("window", (1, 2) + WINDOWS + (P,))
def test_resize_weights_are_tfs(window):
  w = np.asarray(_weights(np.int32(window), P, S))          # traced window: one compilation
  chex.assert_shape(w, (S, P))
  np.testing.assert_array_equal(w[:, :window], _tf_weights(window, S))
  np.testing.assert_array_equal(w[:, window:], 0.0)
  np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
  assert ((w != 0).sum(axis=1) <= 4).all()


@pytest.mark.parametrize("window", (174, 213, 256))
def test_resize_weights_are_tfs_at_recipe_scale(window):
  """Windows of the recipe (short side 256 stored, crops for short sides in [224, 330))."""
  w = np.asarray(_weights(np.int32(window), 256, 224))
  np.testing.assert_array_equal(w[:, :window], _tf_weights(window, 224))


class ResizeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_tf_per_example_windows(self):
    rng = np.random.default_rng(1)
    video = _padded_batch(rng, WINDOWS)
    out = self.variant(functools.partial(da.resize, size=S))(video, np.array(WINDOWS, np.int32))
    chex.assert_shape(out, (len(WINDOWS), T, S, S, 3))
    assert out.dtype == jnp.float32
    for i, w in enumerate(WINDOWS):
      want = tf.image.resize(tf.cast(video[i, :, :w, :w], tf.float32) / 255.0, (S, S),
                             method="bicubic").numpy()
      chex.assert_trees_all_close(out[i], want, atol=RESIZE_ATOL, rtol=0)

  def test_float_input_is_taken_as_is_and_flip_mirrors(self):
    rng = np.random.default_rng(2)
    video = _padded_batch(rng, WINDOWS)
    windows = np.array(WINDOWS, np.int32)
    resize = jax.jit(da.resize, static_argnums=2)
    from_u8 = resize(video, windows, S)
    chex.assert_trees_all_close(resize(video.astype(np.float32) / 255.0, windows, S), from_u8,
                                atol=1e-6, rtol=0)
    flip = np.array([1, 0, 1, 0])
    flipped = np.asarray(resize(video, windows, S, flip))
    chex.assert_trees_all_close(flipped[0], from_u8[0, :, :, ::-1], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(flipped[1], from_u8[1])


# ------------------------------------------------------------------------------------------------
# Colour

def test_rgb_hsv_conversions_match_tf():
  rgb = _colours()
  hsv = tf.image.rgb_to_hsv(rgb).numpy()
  chex.assert_trees_all_close(jax.jit(da.rgb_to_hsv)(rgb), hsv, atol=COLOR_ATOL, rtol=0)
  chex.assert_trees_all_close(jax.jit(da.hsv_to_rgb)(hsv), tf.image.hsv_to_rgb(hsv).numpy(),
                              atol=COLOR_ATOL, rtol=0)
  any_hsv = np.random.default_rng(3).random((1, 4000, 3), dtype=np.float32)
  chex.assert_trees_all_close(jax.jit(da.hsv_to_rgb)(any_hsv), tf.image.hsv_to_rgb(any_hsv).numpy(),
                              atol=COLOR_ATOL, rtol=0)


_saturation = jax.jit(da.adjust_saturation)
_hue = jax.jit(da.adjust_hue)


@pytest.mark.parametrize("factor", (0.0, 0.5, 1.0, 1.7, 3.0))
def test_adjust_saturation_matches_tf(factor):
  rgb = _colours()
  chex.assert_trees_all_close(_saturation(rgb, np.float32([factor])),
                              tf.image.adjust_saturation(rgb, factor).numpy(), atol=COLOR_ATOL, rtol=0)


def test_adjust_saturation_keeps_tfs_hue_one_quirk():
  """TF's kernel greys a colour whose hue rounds up to exactly 1.0: so must the device."""
  rgb = np.array([[[1.0, 0.5, np.nextafter(np.float32(0.5), np.float32(1))]]], np.float32)
  want = tf.image.adjust_saturation(rgb, 1.0).numpy()
  np.testing.assert_array_equal(want, [[[0.5, 0.5, 0.5]]])
  np.testing.assert_array_equal(_saturation(rgb, np.float32([1.0])), want)


@pytest.mark.parametrize("delta", (-1.0, -0.5, -0.2, 0.0, 0.3, 0.5, 0.9999, 1.0))
def test_adjust_hue_matches_tf(delta):
  rgb = _colours()
  chex.assert_trees_all_close(_hue(rgb, np.float32([delta])), tf.image.adjust_hue(rgb, delta).numpy(),
                              atol=COLOR_ATOL, rtol=0)


def test_factors_broadcast_per_example():
  rgb = np.random.default_rng(4).random((3, 2, 5, 5, 3), dtype=np.float32)
  factors = np.float32([0.5, 1.0, 2.5])
  deltas = np.float32([-0.4, 0.0, 0.25])
  sat, hue = _saturation(rgb, factors), _hue(rgb, deltas)
  for i in range(3):
    chex.assert_trees_all_close(sat[i], tf.image.adjust_saturation(rgb[i], factors[i]).numpy(),
                                atol=COLOR_ATOL, rtol=0)
    chex.assert_trees_all_close(hue[i], tf.image.adjust_hue(rgb[i], deltas[i]).numpy(),
                                atol=COLOR_ATOL, rtol=0)


_jitter = jax.jit(da.color_jitter)


def test_color_jitter_identity_is_bitwise_untouched():
  video = np.random.default_rng(5).random((3, 2, 6, 6, 3), dtype=np.float32)
  color = np.float32([da.IDENTITY, [1.6, 2.0, 0.9, 0.3], da.IDENTITY])
  out = np.asarray(_jitter(video, color))
  np.testing.assert_array_equal(out[0], video[0])
  np.testing.assert_array_equal(out[2], video[2])
  assert not np.allclose(out[1], video[1])


@pytest.mark.parametrize("which,value", [(0, 0.6), (0, 1.8), (1, 0.5), (1, 2.7), (2, 0.8), (2, 1.2),
                                         (3, -0.45), (3, 0.2)])
def test_each_color_change_alone_is_the_tf_op(which, value):
  rgb = _colours(6)[0]
  video = rgb[:len(rgb) // 16 * 16].reshape(1, 1, -1, 16, 3)
  color = np.float32([da.IDENTITY])
  color[0, which] = value
  want = _host_colour(tf.constant(video[0]), color[0])
  chex.assert_trees_all_close(_jitter(video, color)[0], want, atol=COLOR_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# The whole device half

FLIPS = np.array([0, 1, 1, 0], np.int32)
COLORS = np.float32([da.IDENTITY, [1.7, 0.6, 0.85, -0.3], [0.7, 1.0, 1.15, 0.0], [1.0, 2.9, 1.0, 0.45]])


class TrainViewsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_host_chain_per_example(self):
    rng = np.random.default_rng(7)
    video = _padded_batch(rng, WINDOWS)
    views = self.variant(functools.partial(da.train_views, size=S))(
        video, np.array(WINDOWS, np.int32), FLIPS, COLORS)
    chex.assert_shape(views, (len(WINDOWS), T, S, S, 3))
    assert views.dtype == jnp.float32
    assert float(views.min()) >= 0.0 and float(views.max()) <= 1.0
    for i, w in enumerate(WINDOWS):
      want = _host_chain(video[i, :, :w, :w], FLIPS[i], COLORS[i], S)
      chex.assert_trees_all_close(views[i], want, atol=CHAIN_ATOL, rtol=0)

  def test_one_compilation_for_any_window_flip_and_colour(self):
    rng = np.random.default_rng(8)
    video = _padded_batch(rng, WINDOWS)
    views = jax.jit(da.train_views, static_argnames="size")
    first = views(video, np.array(WINDOWS, np.int32), FLIPS, COLORS, size=S)
    windows = np.array(WINDOWS[::-1], np.int32)
    video2 = _padded_batch(rng, tuple(windows))
    second = views(video2, windows, 1 - FLIPS, COLORS[::-1], size=S)
    assert views._cache_size() == 1
    chex.assert_trees_all_equal_shapes_and_dtypes(first, second)
    want = _host_chain(video2[0, :, :32, :32], 1, COLORS[3], S)
    chex.assert_trees_all_close(second[0], want, atol=CHAIN_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# The input stream's device path gives the host path's training clips.

def test_the_stream_device_path_equals_the_host_path(tmp_path):
  """Same seeds, same views: decoded windows finished in the step == clips finished in tf.data."""
  from msca_jax.data import sources, stream
  from tests.data import shards

  shards.write(str(tmp_path), "train", num_videos=6, num_shards=2)
  # Every colour change applied often, flips on, and random short sides that need resizing.
  data = shards.data_config(str(tmp_path), color_prob=0.5, flip_prob=0.5, dtype="float32",
                            train_short_side_range=(16, 30))
  source = sources.dmvr_source(str(tmp_path), "train")
  data.augment_on = "host"
  host = stream.TrainStream(source, data, batch_size=6, seed=3)
  data.augment_on = "device"
  window = stream.training_window(data, source)
  device = stream.TrainStream(source, data, batch_size=6, seed=3)
  inputs = jax.jit(stream.model_inputs(data, window))
  applied = np.zeros(4)
  for _ in range(3):
    expected, got = next(host), next(device)
    assert got.device["video"].dtype == np.uint8 and got.device["video"].shape[2] == window
    applied += (got.device["color"] != np.array([1, 1, 1, 0])).sum(axis=0)
    np.testing.assert_array_equal(got.device["label"], expected.device["label"])
    np.testing.assert_allclose(np.asarray(inputs(got.device)), expected.device["video"], atol=2e-5)
  assert applied.min() > 0   # each colour change was exercised
