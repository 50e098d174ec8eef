"""Clip-consistent augmentation: one random view for all frames, the recipe's ranges, exact eval crops."""

import numpy as np
import pytest
import tensorflow as tf

from msca_jax.data import augment


def _jpegs(frames):
  return tf.stack([tf.io.encode_jpeg(f, quality=100) for f in frames])


def _position_image(height, width):
  """R encodes x, G encodes y (0..255 across the frame), B constant: a crop shows where it came from."""
  ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  image = np.stack([xs * 255 / (width - 1), ys * 255 / (height - 1), np.full_like(xs, 128.0)], -1)
  return np.round(image).astype(np.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_every_frame_gets_the_same_view(seed):
  rng = np.random.default_rng(seed)
  frame = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
  aug = augment.TrainAugment(image_size=32, short_side_range=(32, 48), color_prob=1.0,
                             randaugment_layers=2)
  video = augment.train_clip(_jpegs([frame] * 4), tf.constant([seed, 7]), aug).numpy()
  assert video.shape == (4, 32, 32, 3) and video.dtype == np.float32
  assert 0.0 <= video.min() and video.max() <= 1.0   # [0, 1]: the pipeline maps it (to_output)
  for t in range(1, 4):
    np.testing.assert_array_equal(video[t], video[0])


def test_same_seed_same_view_other_seed_other_view():
  frame = _position_image(60, 80)
  aug = augment.TrainAugment(image_size=32, short_side_range=(32, 64))
  jpegs = _jpegs([frame] * 2)
  a = augment.train_clip(jpegs, tf.constant([1, 2]), aug).numpy()
  b = augment.train_clip(jpegs, tf.constant([1, 2]), aug).numpy()
  c = augment.train_clip(jpegs, tf.constant([1, 3]), aug).numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_crop_scale_offset_and_flip_follow_the_recipe():
  """The source window of each view implies a short side in [lo, hi); flips happen about half the time."""
  height, width, size, (lo, hi) = 90, 120, 30, (30, 45)
  frame = _position_image(height, width)
  aug = augment.TrainAugment(image_size=size, short_side_range=(lo, hi), color_prob=0.0)
  implied, flips, lefts = [], 0, []
  for s in range(120):
    view = augment.train_clip(_jpegs([frame]), tf.constant([s, 0]), aug).numpy()[0] * 255
    x_first, x_last = view[size // 2, 0, 0], view[size // 2, -1, 0]
    flipped = x_first > x_last
    flips += flipped
    span_pixels = abs(x_last - x_first) / 255 * (width - 1) * size / (size - 1)
    implied.append(size * height / span_pixels)   # short side that maps the window to `size` pixels
    lefts.append(min(x_first, x_last) / 255 * (width - 1))
    # No view shows anything but the image (the B channel is constant).
    np.testing.assert_allclose(view[..., 2], 128, atol=10)  # JPEG chroma noise
  implied = np.array(implied)
  assert implied.min() > lo - 1.5 and implied.max() < hi + 1.5
  assert implied.max() - implied.min() > (hi - lo) / 2    # the whole range is used
  assert 35 < flips < 85
  assert min(lefts) < 8 and max(lefts) > width - 8 - height * size / lo  # offsets reach both edges


def test_colour_changes_apply_with_their_probability():
  frame = np.random.default_rng(0).integers(40, 200, (32, 32, 3), dtype=np.uint8)
  plain = augment.TrainAugment(image_size=32, short_side_range=(32, 33), flip_prob=0.0, color_prob=0.0)
  jitter = augment.TrainAugment(image_size=32, short_side_range=(32, 33), flip_prob=0.0, color_prob=0.1)
  changed = 0
  for s in range(200):
    seed = tf.constant([s, 1])
    a = augment.train_clip(_jpegs([frame]), seed, plain).numpy()
    b = augment.train_clip(_jpegs([frame]), seed, jitter).numpy()
    changed += not np.allclose(a, b, atol=1e-6)
  # Four changes at p = 0.1 each: P(any) = 1 - 0.9^4 = 0.34.
  assert 40 < changed < 100


def test_eval_views_are_left_centre_right_of_the_resized_frame():
  frame = _position_image(48, 96)   # landscape: crops move along x
  jpegs = _jpegs([frame] * 3)
  indices = tf.constant([[0, 1], [1, 2]])
  views = augment.eval_views(jpegs, indices, image_size=24, short_side=24, num_crops=3).numpy()
  assert views.shape == (6, 2, 24, 24, 3) and views.dtype == np.float32
  assert 0.0 <= views.min() and views.max() <= 1.0
  x = views[..., 0]
  np.testing.assert_allclose(x[0, :, 12, 0], 0.0, atol=0.03)    # left crop starts at the left edge
  np.testing.assert_allclose(x[2, :, 12, -1], 1.0, atol=0.03)   # right crop ends at the right edge
  centre = x[1, 0, 12]
  np.testing.assert_allclose(centre[0] + centre[-1], 1.0, atol=0.03)  # centred
  np.testing.assert_array_equal(views[:3], views[3:])          # same frames content -> same views
  portrait = _jpegs([_position_image(96, 48)])
  views = augment.eval_views(portrait, tf.constant([[0]]), 24, 24, 3).numpy()
  y = views[..., 1]
  np.testing.assert_allclose(y[0, 0, 0, 12], 0.0, atol=0.03)
  np.testing.assert_allclose(y[2, 0, -1, 12], 1.0, atol=0.03)
  one = augment.eval_views(jpegs, tf.constant([[0]]), 24, 32, 1).numpy()
  xc = one[0, 0, 12, :, 0]
  np.testing.assert_allclose(xc[0] + xc[-1], 1.0, atol=0.03)


def test_views_in_0_1_become_what_batches_carry():
  """pipeline.to_output: uint8 round(255 v) by default, or floats 2 v - 1 in [-1, 1]."""
  from msca_jax.data import pipeline
  v = tf.constant([0.0, 0.2, 0.5, 1 / 255, 0.999, 1.0])
  u = pipeline.to_output(v, "uint8").numpy()
  assert u.dtype == np.uint8
  np.testing.assert_array_equal(u, [0, 51, 128, 1, 255, 255])
  f = pipeline.to_output(v, "float32").numpy()
  assert f.dtype == np.float32
  np.testing.assert_allclose(f, [-1.0, -0.6, 0.0, 2 / 255 - 1, 0.998, 1.0], atol=1e-6)
  b = pipeline.to_output(v, "bfloat16")
  assert b.dtype == tf.bfloat16
  np.testing.assert_allclose(tf.cast(b, tf.float32).numpy(), f, atol=1e-2)
  # A real training clip, end to end: the same view in both forms.
  frame = _position_image(40, 40)
  aug = augment.TrainAugment(image_size=16, short_side_range=(16, 24))
  view = augment.train_clip(_jpegs([frame] * 2), tf.constant([3, 4]), aug)
  np.testing.assert_allclose(pipeline.to_output(view, "uint8").numpy().astype(np.float32),
                             (pipeline.to_output(view, "float32").numpy() + 1) / 2 * 255, atol=0.5 + 1e-3)


def test_config_mistakes_name_the_field():
  with pytest.raises(ValueError, match="train_short_side_range"):
    augment.TrainAugment(image_size=224, short_side_range=(200, 300))
  with pytest.raises(ValueError, match="train_short_side_range"):
    augment.TrainAugment(image_size=224, short_side_range=(300, 300))
  with pytest.raises(ValueError, match="crops must be 1 or 3"):
    augment.eval_views(_jpegs([_position_image(8, 8)]), tf.constant([[0]]), 8, 8, 2)


def test_mixup_and_cutmix_weights_match_the_pixels():
  video = tf.concat([tf.zeros((2, 2, 16, 16, 3)), tf.ones((2, 2, 16, 16, 3))], 0)
  batch = {"video": video, "label": tf.constant([0, 1, 2, 3])}
  for s in range(10):
    out = augment.mix_batch(batch, tf.constant([s, 0]), mixup_alpha=0.0, cutmix_alpha=1.0)
    w = out["mix_weight"].numpy()
    own = out["video"].numpy()[0]   # clip 0 is zeros; its partner (clip 3) is ones
    np.testing.assert_allclose(1 - own.mean(), w[0], atol=1e-6)
    np.testing.assert_array_equal(out["label_mix"].numpy(), [3, 2, 1, 0])
    # The box is the same in every frame.
    np.testing.assert_array_equal(own[0], own[1])
    out = augment.mix_batch(batch, tf.constant([s, 0]), mixup_alpha=0.4, cutmix_alpha=0.0)
    w = out["mix_weight"].numpy()
    np.testing.assert_allclose(out["video"].numpy()[0], 1 - w[0], atol=1e-6)
    # uint8 batches (the default) mix in float32 and round back to uint8.
    pixels = {"video": tf.cast(video * 255, tf.uint8), "label": batch["label"]}
    out = augment.mix_batch(pixels, tf.constant([s, 0]), mixup_alpha=0.4, cutmix_alpha=0.0)
    assert out["video"].dtype == tf.uint8
    np.testing.assert_array_equal(out["video"].numpy()[0], np.round(255 * (1 - w[0])))
    out = augment.mix_batch(pixels, tf.constant([s, 0]), mixup_alpha=0.0, cutmix_alpha=1.0)
    own = out["video"].numpy()[0].astype(np.float64) / 255
    assert out["video"].dtype == tf.uint8 and set(np.unique(own)) <= {0.0, 1.0}
    np.testing.assert_allclose(1 - own.mean(), out["mix_weight"].numpy()[0], atol=1e-6)
