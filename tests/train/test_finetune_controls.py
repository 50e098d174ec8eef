"""Fine-tuning controls (config.train.trainable, layer_decay): frozen params stay bitwise equal,
each layer learns at its decayed rate, and a bad value is one line naming the field."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import flax.linen as nn
from flax import traverse_util

from msca_jax.configs import recipe
from benchmarks import step_analysis
from msca_jax.train import mesh as mesh_lib
from msca_jax.train import optim
from msca_jax.train import state as state_lib
from tests import helpers

DEPTH = 3


def train_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = recipe.get_config("vit").train
  cfg.update(dict(base_lr=0.1, base_batch_size=2, batch_size=2, grad_accum_steps=1,
                  num_epochs=10, lr_decay_epochs=(), weight_decay=0.0), **overrides)
  return cfg


@pytest.fixture(scope="module")
def setup():
  model = helpers.small_model(depth=DEPTH)
  clip = helpers.random_clip()
  boxed = model.init(jax.random.key(0), clip)["params"]
  labels = jnp.array([1, 3])

  def loss(params):
    logits = model.apply({"params": params}, clip)
    return optim.classification_loss(logits, labels)[0]

  return boxed, jax.value_and_grad(loss)


def _flat(params) -> dict:
  return traverse_util.flatten_dict(jax.device_get(params), sep="/")


def _steps(setup, cfg, steps: int = 3, boxed: bool = False):
  """`steps` jitted updates with the model's own gradients; boxed: the state mirrors flax boxes."""
  boxed_params, grad_fn = setup
  params = nn.unbox(boxed_params)
  tx = optim.make_optimizer(cfg, steps_per_epoch=10)
  state = tx.init(boxed_params if boxed else params)
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)

  @jax.jit
  def step(params, state):
    _, grads = grad_fn(params)
    if boxed:
      grads = jax.tree_util.tree_map(lambda b, g: b.replace_boxed(g), boxed_params, grads,
                                     is_leaf=is_box)
      updates, state = tx.update(grads, state, boxed_params)
      updates = nn.unbox(updates)
    else:
      updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return nn.unbox(boxed_params), params


@pytest.mark.parametrize("optimizer,accum,boxed", [("sgd", 1, False), ("adamw", 2, True)])
def test_linear_probe_leaves_backbone_bitwise_unchanged(setup, optimizer, accum, boxed):
  # Momentum, weight decay, clipping and accumulation all on: none may touch a frozen leaf.
  cfg = train_cfg(optimizer=optimizer, trainable="head", weight_decay=0.05, momentum=0.9,
                  grad_accum_steps=accum, grad_clip_norm=1.0)
  before, after = _steps(setup, cfg, steps=2 * accum, boxed=boxed)
  before, after = _flat(before), _flat(after)
  for name in before:
    if name.startswith("head/"):
      continue
    assert before[name].tobytes() == after[name].tobytes(), name
  assert not np.array_equal(before["head/kernel"], after["head/kernel"])


def test_last_k_trains_only_the_last_blocks(setup):
  before, after = _steps(setup, train_cfg(trainable="last:1", weight_decay=0.01))
  before, after = _flat(before), _flat(after)
  changed = {name.split("/")[0] if not name.startswith("Transformer/") else name.split("/")[1]
             for name in before if before[name].tobytes() != after[name].tobytes()}
  assert changed == {f"encoderblock_{DEPTH - 1}", "encoder_norm", "head"}


def test_layer_decay_gives_each_block_its_rate(setup):
  boxed_params, _ = setup
  params = nn.unbox(boxed_params)
  decay, lr = 0.5, 0.1
  # Plain SGD at a constant rate: an update is exactly -lr * factor * gradient.
  cfg = train_cfg(layer_decay=decay, momentum=0.0, grad_clip_norm=0.0, base_lr=lr)
  tx = optim.make_optimizer(cfg, steps_per_epoch=10)
  ones = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(ones, tx.init(params), params)
  rates = {name: set(np.unique(-np.asarray(u) / lr).round(7)) for name, u in _flat(updates).items()}
  for name, got in rates.items():
    if name.startswith(("head/", "Transformer/encoder_norm/")):
      want = 1.0
    elif name.startswith(("embedding/", "cls", "Transformer/posembed_input/")):
      want = decay ** (DEPTH + 1)
    else:
      block = int(name.split("/")[1].split("_")[1])
      want = decay ** (DEPTH - block)
    assert got == {round(want, 7)}, (name, got, want)


def _train_step(trainable: str, masked: bool, concrete: bool = True):
  """The trainer's state (abstract unless `concrete`) and step on one device; masked: the step
  stops the gradient at frozen leaves."""
  model = helpers.small_model(depth=DEPTH)
  cfg = train_cfg(trainable=trainable, weight_decay=0.01)
  tx = optim.make_optimizer(cfg, steps_per_epoch=10)
  mesh_cfg = mesh_lib.mesh_config()
  mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:1])
  rules = mesh_lib.rules(mesh_cfg)
  clip = jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.float32)
  if concrete:
    state, shardings = state_lib.create(model, tx, clip, mesh, rules, jax.random.key(0))
  else:
    state, shardings = state_lib.abstract_state(model, tx, clip, mesh, rules)
  mask = optim.trainable_mask(shardings.params, trainable) if masked else None
  step = state_lib.make_train_step(model, tx, optim.training_loss(cfg), shardings, mesh, rules,
                                   trainable=mask)
  batch = mesh_lib.global_batch({"video": np.asarray(helpers.random_clip()),
                                 "label": np.array([1, 3], np.int32)}, mesh)
  return state, step, batch


def test_frozen_layers_get_no_backward_pass():
  # The trainer passes trainable_mask to the step (trainer.make_train_step), which stops the
  # gradient at frozen leaves: the program holds no backward pass for them (FLOPs), and the
  # update is the one the full gradient gives through the optimiser's set_to_zero.
  every = optim.trainable_mask(_train_step("all", masked=False, concrete=False)[0].params, "all")
  assert all(jax.tree.leaves(every))
  flops = {}
  for trainable in ("all", "last:1", "head"):
    state, step, batch = _train_step(trainable, masked=trainable != "all", concrete=False)
    flops[trainable] = step_analysis.flops(step.lower(state, batch, jax.random.key(1)))
  forward = flops["all"] / 3   # a backward pass costs about two forward passes
  assert flops["head"] < 1.2 * forward < flops["last:1"] < flops["all"], flops

  results = []
  for masked in (True, False):
    state, step, batch = _train_step("last:1", masked)
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(1))
    results.append((_flat(state.params), float(metrics["grad_norm"])))
  (got, got_norm), (want, want_norm) = results
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
  # The reported norm is the trained leaves' (the frozen ones' gradients are zeros).
  assert 0 < got_norm < want_norm


@pytest.mark.parametrize("field,value", [("trainable", "last:0"), ("trainable", "backbone"),
                                         ("layer_decay", 0.0), ("layer_decay", 1.5)])
def test_bad_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=rf"^config\.train\.{field} = "):
    optim.check_config(train_cfg(**{field: value}))


def test_clip_backbone_params_have_layers():
  # CLIP's pre_norm sits with the embeddings and its proj with the head: a linear probe on CLIP
  # trains the head on the projected features, the rest frozen.
  model = helpers.small_model(depth=2, backbone="clip", proj_dim=16)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), helpers.random_clip()))["params"]
  layers = _flat(optim.param_layers(nn.unbox(params)))
  assert layers["Transformer/pre_norm/scale"] == 0 and layers["proj/kernel"] == 3
  trained = _flat(optim.trainable_mask(nn.unbox(params), "head"))
  assert [k for k, v in trained.items() if v] == ["head/bias", "head/kernel"]
