"""The synthetic dataset: exact time-reversed class pairs, deterministic, with real motion."""

import numpy as np
import pytest

from msca_jax.data import synthetic


def _shape_mask(frames):
  # Shapes have every channel >= 0.55 * 255; the background stays below 0.5 * 255.
  return frames.min(axis=-1) > 130


def _centroids(frames):
  mask = _shape_mask(frames)
  ys, xs = np.meshgrid(np.arange(frames.shape[1]), np.arange(frames.shape[2]), indexing="ij")
  return np.stack([(ys * m).sum() / m.sum() for m in mask]), np.stack([(xs * m).sum() / m.sum() for m in mask])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("label", [0, 2, 4, 6])
def test_each_class_is_its_partner_played_backwards(seed, label):
  params = synthetic.sample_params(np.random.default_rng(seed))
  forward = synthetic.render(params, label, num_frames=9)
  backward = synthetic.render(params, synthetic.partner(label), num_frames=9)
  np.testing.assert_array_equal(forward[::-1], backward)
  # So the frames of the two classes are the same set: nothing frame-wise tells them apart.
  assert not np.array_equal(forward, backward)


def test_clips_are_deterministic_and_balanced():
  a, label_a = synthetic.clip(seed=3, index=5)
  b, label_b = synthetic.clip(seed=3, index=5)
  np.testing.assert_array_equal(a, b)
  assert label_a == label_b == 5
  assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
  assert not np.array_equal(synthetic.clip(seed=4, index=5)[0], a)
  labels = [synthetic.clip(seed=0, index=i, num_frames=2, size=8)[1] for i in range(16)]
  assert np.bincount(labels).tolist() == [2] * len(synthetic.CLASSES)


@pytest.mark.parametrize("seed", range(4))
def test_motion_goes_the_way_the_class_says(seed):
  params = synthetic.sample_params(np.random.default_rng(seed))
  render = lambda name: synthetic.render(params, synthetic.CLASSES.index(name), num_frames=8, size=48)
  _, x = _centroids(render("move_left"))
  assert x[-1] < x[0] - 2
  _, x = _centroids(render("move_right"))
  assert x[-1] > x[0] + 2
  y, _ = _centroids(render("move_up"))
  assert y[-1] < y[0] - 2
  y, _ = _centroids(render("move_down"))
  assert y[-1] > y[0] + 2
  area = _shape_mask(render("grow")).sum(axis=(1, 2))
  assert area[-1] > 1.5 * area[0]
  area = _shape_mask(render("shrink")).sum(axis=(1, 2))
  assert area[-1] < area[0] / 1.5


def test_rotation_direction_on_screen():
  # An arrow pointing up (angle 0: its tip is at -y) turns right under clockwise rotation.
  params = synthetic.ClipParams(shape="arrow", color=(1.0, 1.0, 1.0), background=(0.0, 0.0, 0.0),
                                center=(0.5, 0.5), size=0.3, angle=0.0, speed=1.0, noise_seed=0)
  frames = synthetic.render(params, synthetic.CLASSES.index("rotate_clockwise"), num_frames=3, size=64)
  before, _, after = _shape_mask(frames)
  top_half = slice(0, 28)
  right = lambda m: m[top_half, 32:].sum() - m[top_half, :32].sum()
  assert right(after) > right(before) + 20


def test_bad_label():
  params = synthetic.sample_params(np.random.default_rng(0))
  with pytest.raises(ValueError, match="label must be in"):
    synthetic.render(params, 8)
