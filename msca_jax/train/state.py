"""Train state, initialised directly into its shardings, and the jitted train and eval steps."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msca_jax.train import evaluate
from msca_jax.train import mesh as mesh_lib

# loss_fn(logits, batch) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[jax.Array, dict], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, clip: jax.ShapeDtypeStruct):
  def init(rng: jax.Array) -> TrainState:
    # Boxed params: the optimiser state mirrors them, boxes included, so both get shardings.
    params = model.init(rng, jnp.zeros(clip.shape, clip.dtype))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def state_shardings(model, tx, clip, mesh: Mesh, logical_rules) -> TrainState:
  """NamedShardings of the (unboxed) train state, from an abstract init (nothing allocated)."""
  abstract = jax.eval_shape(_init_fn(model, tx, clip), jax.random.key(0))
  return mesh_lib.tree_shardings(abstract, mesh, logical_rules)


def abstract_state(model, tx, clip, mesh: Mesh, logical_rules) -> tuple[TrainState, TrainState]:
  """(ShapeDtypeStructs carrying the shardings, shardings): a restore target; nothing allocated."""
  shardings = state_shardings(model, tx, clip, mesh, logical_rules)
  shapes = nn.unbox(jax.eval_shape(_init_fn(model, tx, clip), jax.random.key(0)))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return abstract, shardings


def with_params(params, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """A step-0 state around given (e.g. pretrained) params, the optimiser state fresh."""
  params = jax.device_put(params, shardings.params)
  init = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
  return jax.jit(init, out_shardings=shardings)(params)


def create(model, tx, clip: jax.ShapeDtypeStruct, mesh: Mesh, logical_rules,
           rng: jax.Array) -> tuple[TrainState, TrainState]:
  """(state, shardings): every array is created on its own shards, never whole on one device."""
  shardings = state_shardings(model, tx, clip, mesh, logical_rules)
  init = _init_fn(model, tx, clip)
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, loss_fn: LossFn,
                    shardings: TrainState, mesh: Mesh, logical_rules,
                    inputs: Callable[[dict], jax.Array] | None = None, trainable: Any = None):
  """step(state, batch, rng) -> (state, metrics); the old state's buffers are donated.

  `inputs(batch)` gives the model's video (data/stream.py's `model_inputs`: where the views
  are finished on the device); by default batch['video'] as it is.
  `trainable` (a tree of bools like the params, optim.trainable_mask) stops the gradient at the
  frozen leaves, so their backward pass is never built: a linear probe costs a forward pass and
  the head's gradient. Their gradients are zeros, which the optimiser ignores anyway.
  step.lower(state, batch, rng) lowers it ahead of time (a jax.stages.Lowered).
  """
  batch_sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))

  def step(state: TrainState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    video = inputs(batch) if inputs is not None else batch["video"]

    def objective(params):
      if trainable is not None:
        params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
      logits = model.apply({"params": params}, video, train=True, rngs={"dropout": rng})
      loss, metrics = loss_fn(logits, batch)
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  jitted = jax.jit(step, in_shardings=(shardings, batch_sharding, mesh_lib.replicated(mesh)),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))

  def run(state: TrainState, batch: dict, rng: jax.Array):
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
      return jitted(state, batch, rng)
  run.lower = _lowering(jitted, mesh, logical_rules)
  run.jitted = jitted   # for jax.export (tests/test_lowering.py): the same function, unwrapped
  return run


def make_eval_step(model: nn.Module, shardings: TrainState, mesh: Mesh, logical_rules):
  """step(params, batch) -> batch without 'video', plus 'logits' (B, C) averaged over the views.

  batch['video'] is (B, V, T, H, W, 3): the views are folded into the batch, the model averages
  over frames, the step over views. Everything returned is replicated, so every process holds the
  whole global batch's logits next to the labels and masks they belong to (the keys stay on the
  hosts: data/stream.py).
  """
  def step(params, batch):
    video = batch["video"]
    b, v = video.shape[:2]
    logits = model.apply({"params": params}, video.reshape((b * v,) + video.shape[2:]))
    rest = {name: value for name, value in batch.items() if name != "video"}
    return dict(rest, logits=evaluate.average_views(logits, num_views=v))

  jitted = jax.jit(step, in_shardings=(shardings.params, NamedSharding(mesh, P(mesh_lib.BATCH_AXES))),
                   out_shardings=mesh_lib.replicated(mesh))

  def run(params, batch: dict):
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
      return jitted(params, batch)
  run.lower = _lowering(jitted, mesh, logical_rules)
  run.jitted = jitted
  return run


def _lowering(jitted, mesh: Mesh, logical_rules):
  """step.lower(*args) -> jax.stages.Lowered of the very function step(*args) runs.

  `.compile()` on it gives the executable the step would build (same shardings, same donation),
  for ahead-of-time compilation, cost and memory analysis, and the HLO text (benchmarks/benchmark.py).
  """
  def lower(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
      return jitted.lower(*args)
  return lower
