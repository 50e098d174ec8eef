"""The recipe's optimiser: schedules in updates, accumulation, clipping, decay mask, loss."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from msca_jax.configs import recipe
from msca_jax.train import optim
from tests import helpers


def _paper(**overrides):
  train = recipe.get_config("vit").train
  train.update(overrides)
  return train


def _demo(**overrides):
  train = recipe.get_config("vit", "demo").train
  train.update(overrides)
  return train


def _plain_sgd(**overrides):
  """SGD at lr 1 without momentum, decay or clipping: updates show each piece on its own."""
  base = dict(base_lr=1.0, base_batch_size=4, batch_size=4, grad_accum_steps=1, momentum=0.0,
              weight_decay=0.0, grad_clip_norm=0.0)
  base.update(overrides)
  return _paper(**base)


@functools.lru_cache(maxsize=1)
def _abstract_params():
  """The small model's boxed params as ShapeDtypeStructs (nothing is computed)."""
  model = helpers.small_model(depth=1)
  clip = jax.ShapeDtypeStruct((1, 2, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(clip.shape))["params"])


def _ones(abstract):
  return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract)


def _names(tree):
  """{'a/b/kernel': leaf} of an unboxed tree."""
  return {"/".join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# Learning-rate schedules.

def test_peak_learning_rate_scales_with_the_effective_batch():
  assert optim.effective_batch_size(_paper()) == 420
  assert optim.peak_learning_rate(_paper()) == pytest.approx(0.1)
  assert optim.peak_learning_rate(_paper(grad_accum_steps=5)) == pytest.approx(0.05)
  assert optim.peak_learning_rate(_paper(batch_size=84, grad_accum_steps=1)) == pytest.approx(0.02)
  assert optim.peak_learning_rate(_demo()) == pytest.approx(1e-3)


def test_step_schedule_decays_at_the_epochs_in_updates():
  # 20 micro-batches per epoch, 10 per update: 2 updates per epoch, decays at updates 20 and 30.
  schedule = optim.learning_rate_schedule(_paper(), steps_per_epoch=20)
  want = {0: 0.1, 19: 0.1, 20: 0.01, 29: 0.01, 30: 0.001, 35: 0.001, 1000: 0.001}
  for update, lr in want.items():
    assert float(schedule(update)) == pytest.approx(lr, rel=1e-6), update


def test_step_schedule_when_accumulation_does_not_divide_the_epoch():
  # 7 micro-batches per epoch, 2 per update: epoch 10 starts at micro-batch 70 = update 35, epoch 15
  # at micro-batch 105, inside update 52 (104-105); the first update wholly in it is 53.
  cfg = _paper(grad_accum_steps=2)
  peak = 0.1 * 84 / 420
  schedule = optim.learning_rate_schedule(cfg, steps_per_epoch=7)
  want = {0: peak, 34: peak, 35: peak / 10, 52: peak / 10, 53: peak / 100}
  for update, lr in want.items():
    assert float(schedule(update)) == pytest.approx(lr, rel=1e-6), update
  assert optim.updates_per_epoch(cfg, 7) == 3.5


def test_step_schedule_with_warmup():
  schedule = optim.learning_rate_schedule(_paper(warmup_epochs=1), steps_per_epoch=40)  # 4/epoch
  want = {0: 0.0, 1: 0.025, 2: 0.05, 4: 0.1, 39: 0.1, 40: 0.01, 60: 0.001}
  for update, lr in want.items():
    assert float(schedule(update)) == pytest.approx(lr, rel=1e-6, abs=1e-12), update


def test_cosine_schedule_with_warmup():
  # The demo: 1 warmup epoch then cosine to 0 at epoch 10; 10 updates per epoch.
  schedule = optim.learning_rate_schedule(_demo(), steps_per_epoch=10)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5e-3)
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(55)) == pytest.approx(0.5e-3)
  assert float(schedule(30)) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 20 / 90)))
  assert 0 < float(schedule(99)) < 1e-6
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
  assert float(schedule(500)) == pytest.approx(0.0, abs=1e-12)
  lrs = np.asarray(jax.vmap(schedule)(jnp.arange(10, 101)))
  assert np.all(np.diff(lrs) <= 0)


@pytest.mark.parametrize("cfg", [_paper(warmup_epochs=2), _demo()], ids=["step", "cosine"])
def test_schedule_under_jit_matches_eager(cfg):
  schedule = optim.learning_rate_schedule(cfg, steps_per_epoch=30)
  counts = jnp.arange(0, 100, 7, dtype=jnp.int32)
  np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(counts),
                             [float(schedule(int(c))) for c in counts], rtol=1e-6)


# Gradient accumulation, clipping, weight decay.

def _linear_loss(params, x, y):
  return jnp.mean((x @ params["dense"]["kernel"] + params["dense"]["bias"] - y) ** 2)


def test_accumulated_micro_batches_equal_one_big_batch():
  """k micro-steps through MultiSteps == one step on the concatenated batch, across a decay."""
  common_fields = dict(base_lr=0.5, base_batch_size=12, momentum=0.9, weight_decay=0.01,
                       grad_clip_norm=1.0, num_epochs=3, lr_decay_epochs=(1,))
  k = 3
  accumulated = optim.make_optimizer(_paper(batch_size=4, grad_accum_steps=k, **common_fields),
                                     steps_per_epoch=6)
  big = optim.make_optimizer(_paper(batch_size=12, grad_accum_steps=1, **common_fields),
                             steps_per_epoch=2)
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}

  def stepper(tx):
    @jax.jit
    def step(params, state, x, y):
      grads = jax.grad(_linear_loss)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    return step

  step_acc, step_big = stepper(accumulated), stepper(big)
  p_acc, s_acc = params, accumulated.init(params)
  p_big, s_big = params, big.init(params)
  for update in range(4):  # updates 2 and 3 run at the decayed rate
    x = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(12, 2)) * 5, jnp.float32)  # big enough to be clipped
    p_big, s_big = step_big(p_big, s_big, x, y)
    for micro in range(k):
      before = p_acc
      p_acc, s_acc = step_acc(p_acc, s_acc, x[4 * micro:4 * micro + 4], y[4 * micro:4 * micro + 4])
      if micro < k - 1:
        chex.assert_trees_all_equal(p_acc, before)  # no change until the k-th micro-batch
    chex.assert_trees_all_close(p_acc, p_big, rtol=1e-5, atol=1e-6)
    assert int(optim.update_count(s_acc)) == int(optim.update_count(s_big)) == update + 1


def test_schedule_counts_updates_not_micro_steps():
  cfg = _paper(batch_size=2, grad_accum_steps=4, base_batch_size=8, num_epochs=4,
               lr_decay_epochs=(1,))  # 8 micro-batches per epoch = 2 updates; decay at update 2
  tx = optim.make_optimizer(cfg, steps_per_epoch=8)
  params = {"w": jnp.ones((3,))}
  state = tx.init(params)
  update = tx.update
  counts, lrs = [], []
  for _ in range(13):
    _, state = update({"w": jnp.ones((3,))}, state, params)
    assert isinstance(state, optax.MultiStepsState)
    # The schedule's own count (in the inner state) is MultiSteps' gradient_step.
    assert int(optim.update_count(state)) == int(state.gradient_step)
    counts.append(int(state.gradient_step))
    lrs.append(float(optim.current_learning_rate(cfg, 8, state)))
  assert counts == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
  assert int(state.mini_step) == 1
  np.testing.assert_allclose(lrs, [0.1] * 7 + [0.01] * 6, rtol=1e-6)
  assert float(optim.current_learning_rate(cfg, 8, 2)) == pytest.approx(0.01)


@pytest.mark.parametrize("accum", [1, 2])
def test_huge_gradient_is_clipped_to_norm_one(accum):
  grads = {"w": jnp.full((4,), 1e6), "b": jnp.full((3,), -2e6)}
  params = jax.tree.map(jnp.zeros_like, grads)
  norm = optax.tree.norm(grads)
  for clip, want_norm in [(1.0, 1.0), (0.0, float(norm))]:
    tx = optim.make_optimizer(_plain_sgd(grad_clip_norm=clip, grad_accum_steps=accum,
                                         base_batch_size=4 * accum), steps_per_epoch=10)
    state = tx.init(params)
    for _ in range(accum):
      updates, state = tx.update(grads, state, params)
    assert float(optax.tree.norm(updates)) == pytest.approx(want_norm, rel=1e-5)
    # The direction is kept: -g / |g| * want_norm (lr 1).
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -g / norm * want_norm, grads),
                                rtol=1e-5)


def test_weight_decay_mask_names_kernels_only():
  mask = _names(nn.unbox(optim.weight_decay_mask(nn.unbox(_abstract_params()))))
  decayed = sorted(name for name, m in mask.items() if m)
  assert decayed == sorted(name for name in mask if name.endswith("/kernel"))
  for name in ["cls", "Transformer/posembed_input/pos_embedding", "embedding/bias",
               "Transformer/encoderblock_0/LayerNorm_0/scale",
               "Transformer/encoderblock_0/LayerNorm_0/bias", "Transformer/encoder_norm/scale",
               "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/bias",  # 2-D
               "head/bias"]:
    assert not mask[name], name
  for name in ["embedding/kernel", "head/kernel",
               "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel",
               "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"]:
    assert mask[name], name
  # A boxed tree gets the same mask, one leaf per box.
  boxed = optim.weight_decay_mask(_abstract_params())
  assert _names(boxed) == mask


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_touches_only_kernels(optimizer):
  cfg = _plain_sgd(optimizer=optimizer, weight_decay=0.1, momentum=0.9)
  params = _ones(nn.unbox(_abstract_params()))
  tx = optim.make_optimizer(cfg, steps_per_epoch=10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
  # Zero gradients: the update is the decay alone, lr * wd * param (coupled SGD and decoupled AdamW
  # agree at lr 1 with zero moments).
  for name, update in _names(updates).items():
    want = -0.1 if name.endswith("/kernel") else 0.0
    np.testing.assert_allclose(update, np.full(update.shape, want), atol=1e-7, err_msg=name)


# k=2 only: MultiSteps wraps the k=1 chain, so both are exercised.
@pytest.mark.parametrize("optimizer,accum", [("sgd", 2), ("adamw", 2)])
def test_boxed_and_plain_params(optimizer, accum):
  """init on boxed params mirrors the boxes (for shardings); unboxed, it equals the plain init."""
  cfg = _plain_sgd(optimizer=optimizer, weight_decay=0.1, momentum=0.9, grad_clip_norm=1.0,
                   grad_accum_steps=accum, base_batch_size=4 * accum)
  tx = optim.make_optimizer(cfg, steps_per_epoch=10)
  abstract = _abstract_params()
  boxed = _ones(abstract)
  plain = nn.unbox(boxed)
  boxed_state = tx.init(boxed)
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  assert any(is_box(x) for x in jax.tree.leaves(boxed_state, is_leaf=is_box))
  abstract_state = jax.eval_shape(tx.init, abstract)  # what the train state does for shardings
  assert jax.tree.structure(abstract_state) == jax.tree.structure(boxed_state)
  plain_state = tx.init(plain)
  chex.assert_trees_all_equal(nn.unbox(boxed_state), plain_state)
  update = tx.update

  grads = jax.tree.map(lambda p: 0.01 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), plain)
  want, state = grads, plain_state
  for _ in range(accum):
    want, state = update(grads, state, plain)
  got, state_b = grads, nn.unbox(boxed_state)
  for _ in range(accum):
    got, state_b = update(grads, state_b, plain)  # the trainer: unboxed state and params
  chex.assert_trees_all_close(got, want)
  # Fully boxed update too (gradients of boxed params are boxed).
  boxed_grads = jax.tree.map(lambda b, g: b.replace_boxed(g), boxed, grads, is_leaf=is_box)
  got_boxed, state_bb = boxed_grads, boxed_state
  for _ in range(accum):
    got_boxed, state_bb = update(boxed_grads, state_bb, boxed)
  chex.assert_trees_all_close(nn.unbox(got_boxed), want)
  assert float(optax.tree.norm(want)) > 0


# Loss and accuracy.

def _numpy_smoothed_ce(logits, labels, smoothing):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  num_classes = logits.shape[-1]
  targets = (1 - smoothing) * np.eye(num_classes)[labels] + smoothing / num_classes
  return -(targets * logp).sum(-1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_matches_numpy_label_smoothed_cross_entropy(smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 11)).astype(np.float32) * 3
  labels = rng.integers(0, 11, 6)
  want = _numpy_smoothed_ce(logits, labels, smoothing)
  loss, per_example = optim.classification_loss(logits, labels, label_smoothing=smoothing)
  np.testing.assert_allclose(per_example, want, rtol=1e-5)
  assert float(loss) == pytest.approx(want.mean(), rel=1e-5)
  if smoothing == 0:
    np.testing.assert_allclose(
        per_example, optax.softmax_cross_entropy_with_integer_labels(logits, labels), rtol=1e-5)
  # bfloat16 logits are computed in float32.
  _, per_bf16 = optim.classification_loss(logits.astype(jnp.bfloat16), labels,
                                          label_smoothing=smoothing)
  assert per_bf16.dtype == jnp.float32


def test_loss_mixes_the_two_labels():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 5)).astype(np.float32)
  labels, label_mix = np.array([0, 1, 2, 3]), np.array([3, 2, 1, 0])
  mix_weight = np.array([0.7, 0.7, 0.2, 1.0], np.float32)
  _, per_example = optim.classification_loss(logits, labels, label_smoothing=0.1,
                                             label_mix=label_mix, mix_weight=mix_weight)
  want = (mix_weight * _numpy_smoothed_ce(logits, labels, 0.1)
          + (1 - mix_weight) * _numpy_smoothed_ce(logits, label_mix, 0.1))
  np.testing.assert_allclose(per_example, want, rtol=1e-5)
  with pytest.raises(ValueError, match="label_mix and mix_weight"):
    optim.classification_loss(logits, labels, label_mix=label_mix)


def test_training_loss_smooths_and_mixes_what_the_batch_carries():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 5)).astype(np.float32)
  labels, label_mix = np.array([0, 1, 2, 3]), np.array([3, 2, 1, 0])
  mix_weight = np.array([0.7, 0.7, 0.2, 1.0], np.float32)
  loss_fn = optim.training_loss(_paper())   # label smoothing 0.1
  loss, metrics = loss_fn(logits, {"label": labels})
  np.testing.assert_allclose(loss, _numpy_smoothed_ce(logits, labels, 0.1).mean(), rtol=1e-5)
  assert metrics["accuracy"] == np.mean(logits.argmax(-1) == labels)
  mixed, _ = loss_fn(logits, {"label": labels, "label_mix": label_mix, "mix_weight": mix_weight})
  want = (mix_weight * _numpy_smoothed_ce(logits, labels, 0.1)
          + (1 - mix_weight) * _numpy_smoothed_ce(logits, label_mix, 0.1)).mean()
  np.testing.assert_allclose(mixed, want, rtol=1e-5)


def test_loss_weights_mask_examples():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 5)
  weights = np.array([1, 0, 1, 1, 0], np.float32)
  loss, per_example = optim.classification_loss(logits, labels, weights=weights)
  assert float(loss) == pytest.approx(float(per_example[weights > 0].mean()), rel=1e-6)

  def masked_loss(logits, weights):
    return optim.classification_loss(logits, labels, label_smoothing=0.1, weights=weights)[0]

  # Padded examples get no gradient; all-zero weights give a finite 0 loss and zero gradients.
  grads = jax.grad(masked_loss)(logits, weights)
  assert np.all(np.asarray(grads)[weights == 0] == 0)
  zeros = np.zeros(5, np.float32)
  assert float(masked_loss(logits, zeros)) == 0.0
  grads = jax.grad(masked_loss)(logits, zeros)
  assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads) == 0)


def test_accuracy_counts():
  logits = np.array([[9, 8, 7, 6, 5, 4, 0],   # label 0: top-1
                     [9, 8, 7, 6, 5, 4, 0],   # label 4: top-5 only
                     [9, 8, 7, 6, 5, 4, 0],   # label 5: neither
                     [0, 1, 2, 3, 4, 5, 9]],  # label 6: top-1, but weight 0
                    np.float32)
  labels = np.array([0, 4, 5, 6])
  top1, top5 = optim.accuracy_counts(logits, labels)
  assert (float(top1), float(top5)) == (2.0, 3.0)
  top1, top5 = optim.accuracy_counts(logits, labels, np.array([1, 1, 1, 0], np.float32))
  assert (float(top1), float(top5)) == (1.0, 2.0)
  # Fewer than 5 classes: top-5 is every class.
  top1, top5 = optim.accuracy_counts(logits[:, :3], np.array([2, 1, 0, 0]))
  assert (float(top1), float(top5)) == (1.0, 4.0)


# Bad configuration values name the field.

@pytest.mark.parametrize("field,value", [
    ("optimizer", "adam"), ("schedule", "linear"), ("base_lr", 0.0), ("base_batch_size", 0),
    ("batch_size", -1), ("grad_accum_steps", 0), ("num_epochs", 0), ("warmup_epochs", -1),
    ("warmup_epochs", 18), ("weight_decay", -0.1), ("grad_clip_norm", -1.0), ("momentum", 1.0),
    ("label_smoothing", 1.0), ("lr_decay_factor", 0.0), ("lr_decay_epochs", (15, 10)),
    ("lr_decay_epochs", (0, 10))])
def test_bad_config_values_name_the_field(field, value):
  cfg = _paper()
  with cfg.unlocked():
    cfg[field] = value
  with pytest.raises(ValueError, match=f"config.train.{field} = "):
    optim.make_optimizer(cfg, steps_per_epoch=10)


def test_bad_steps_per_epoch():
  with pytest.raises(ValueError, match="steps_per_epoch = 0"):
    optim.learning_rate_schedule(_paper(), 0)


def test_decay_epochs_past_the_end_are_allowed():
  schedule = optim.learning_rate_schedule(_paper(num_epochs=1), steps_per_epoch=10)
  assert float(schedule(5)) == pytest.approx(0.1)
