"""Optimiser, learning-rate schedule and loss of the training recipe (docs/recipe.md).

The recipe: SGD momentum 0.9, no weight decay, lr 0.1 per 420 clips (42 clips x 10 accumulated
micro-batches), x0.1 at epochs 10 and 15 of 18, gradient clipping at global norm 1.0, label
smoothing 0.1. Everything is read from `config.train` (msca_jax/configs/recipe.py).

Fine-tuning controls (docs/datasets.md): `config.train.trainable` picks the parameters that learn
('all'; 'head', a linear probe of the head alone; 'last:K', the last K blocks, the final norm
and the head), and the others get exactly zero updates; `config.train.layer_decay` < 1 scales block i of L by
decay^(L - i), the patch embedding, CLS token and position embedding by decay^(L + 1), and the
final norm and head by 1 (the BEiT / MAE convention).

Units. A *train step* consumes one micro-batch of `config.train.batch_size` clips (the global
batch, over all hosts); an *optimiser update* happens every `grad_accum_steps` train steps.
`steps_per_epoch` arguments count train steps (micro-batches), which is what the trainer's loop
counts; schedules are functions of the number of optimiser updates, because optax evaluates them
with the count kept in the optimiser state, and `optax.MultiSteps` only advances that state on
real updates.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
ADAM_B1, ADAM_B2 = 0.9, 0.999
# Only these leaves are decayed. A name rule, not an ndim one: the attention biases are 2-D
# (heads, head_dim), and the position embedding and CLS token are 3-D.
DECAYED_PARAM_NAMES = ("kernel",)
# Where each parameter sits for trainable / layer_decay: before the first block (layer 0) or after
# the last (layer L + 1). A backbone with other names adds them here.
EMBEDDING_PARAM_NAMES = ("embedding", "cls", "posembed_input", "pre_norm")  # pre_norm: CLIP's ln_pre
TOP_PARAM_NAMES = ("encoder_norm", "proj", "head")  # proj: CLIP's projection
_BLOCK_RE = re.compile(r"^encoderblock_(\d+)$")
TRAINABLE_TEXT = "'all', 'head' (a linear probe) or 'last:K' (the last K blocks, the final norm and the head)"


def _fail(field: str, value: Any, expected: str) -> None:
  raise ValueError(f"config.train.{field} = {value!r}: expected {expected}")


def _number(train_cfg, field: str, *, minimum: float, strict: bool,
            integer: bool = False) -> float:
  """Reads a numeric field and checks it against its lower bound."""
  value = train_cfg[field]
  kind = int if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kind):
    _fail(field, value, "an integer" if integer else "a number")
  if (value <= minimum) if strict else (value < minimum):
    _fail(field, value, f"{'>' if strict else '>='} {minimum}")
  return value


def check_config(train_cfg) -> None:
  """Raises ValueError naming the `config.train` field that is out of range."""
  optimizer = train_cfg.optimizer
  if optimizer not in OPTIMIZERS:
    _fail("optimizer", optimizer, f"one of {OPTIMIZERS}")
  schedule = train_cfg.get("schedule", "step")
  if schedule not in SCHEDULES:
    _fail("schedule", schedule, f"one of {SCHEDULES}")
  _number(train_cfg, "base_lr", minimum=0, strict=True)
  _number(train_cfg, "base_batch_size", minimum=0, strict=True, integer=True)
  _number(train_cfg, "batch_size", minimum=0, strict=True, integer=True)
  _number(train_cfg, "grad_accum_steps", minimum=1, strict=False, integer=True)
  num_epochs = _number(train_cfg, "num_epochs", minimum=0, strict=True)
  warmup = _number(train_cfg, "warmup_epochs", minimum=0, strict=False)
  if warmup >= num_epochs:
    _fail("warmup_epochs", warmup, f"< config.train.num_epochs = {num_epochs}")
  _number(train_cfg, "weight_decay", minimum=0, strict=False)
  _number(train_cfg, "grad_clip_norm", minimum=0, strict=False)
  momentum = _number(train_cfg, "momentum", minimum=0, strict=False)
  if momentum >= 1:
    _fail("momentum", momentum, "< 1")
  smoothing = _number(train_cfg, "label_smoothing", minimum=0, strict=False)
  if smoothing >= 1:
    _fail("label_smoothing", smoothing, "< 1")
  if schedule == "step":
    _number(train_cfg, "lr_decay_factor", minimum=0, strict=True)
    epochs = train_cfg.lr_decay_epochs
    if not isinstance(epochs, Sequence) or isinstance(epochs, str) or any(
        isinstance(e, bool) or not isinstance(e, (int, float)) or e <= 0 for e in epochs):
      _fail("lr_decay_epochs", epochs, "a sequence of positive epochs")
    # Epochs past num_epochs are allowed: a shortened run keeps the paper's decay epochs.
    if list(epochs) != sorted(set(epochs)):
      _fail("lr_decay_epochs", epochs, "strictly increasing epochs")
  parse_trainable(train_cfg.get("trainable", "all"))
  decay = _number(train_cfg, "layer_decay", minimum=0, strict=True) if "layer_decay" in train_cfg else 1.0
  if decay > 1:
    _fail("layer_decay", decay, "in (0, 1] (1.0 is off)")


def parse_trainable(value: Any) -> int | None:
  """config.train.trainable -> None ('all') or the number of trainable blocks ('head': 0)."""
  if value == "all":
    return None
  if value == "head":
    return 0
  match = re.fullmatch(r"last:(\d+)", value) if isinstance(value, str) else None
  if not match or int(match[1]) < 1:
    _fail("trainable", value, TRAINABLE_TEXT)
  return int(match[1])


def _check_steps_per_epoch(steps_per_epoch: int) -> None:
  if (isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, numbers.Integral)
      or steps_per_epoch < 1):
    raise ValueError(f"steps_per_epoch = {steps_per_epoch!r}: expected a positive integer "
                     "(train steps, i.e. micro-batches, per epoch)")


def effective_batch_size(train_cfg) -> int:
  """Clips per optimiser update: batch_size x grad_accum_steps."""
  return int(train_cfg.batch_size) * int(train_cfg.grad_accum_steps)


def peak_learning_rate(train_cfg) -> float:
  """base_lr scaled linearly with the effective batch (the paper: 0.1 per 420 clips)."""
  scale = effective_batch_size(train_cfg) / float(train_cfg.base_batch_size)
  return float(train_cfg.base_lr) * scale


def updates_per_epoch(train_cfg, steps_per_epoch: int) -> float:
  """Optimiser updates per epoch; fractional when grad_accum_steps does not divide the epoch."""
  return steps_per_epoch / int(train_cfg.grad_accum_steps)


def learning_rate_schedule(train_cfg, steps_per_epoch: int) -> optax.Schedule:
  """lr as a function of the optimiser-update count (0 for the first update).

  'step': the peak lr times lr_decay_factor for every epoch in lr_decay_epochs that has begun;
  'cosine': cosine decay from the peak to 0 at num_epochs. Both ramp up linearly from 0 over
  warmup_epochs first (the first update then has lr 0). An epoch boundary falls inside an update
  when grad_accum_steps does not divide steps_per_epoch: an epoch's rate starts with the first
  update whose first micro-batch belongs to that epoch.

  Args:
    train_cfg: `config.train`.
    steps_per_epoch: train steps (micro-batches of batch_size clips) per epoch.
  """
  check_config(train_cfg)
  _check_steps_per_epoch(steps_per_epoch)
  peak = peak_learning_rate(train_cfg)
  per_epoch = updates_per_epoch(train_cfg, steps_per_epoch)
  warmup = float(train_cfg.warmup_epochs) * per_epoch
  total = float(train_cfg.num_epochs) * per_epoch

  if train_cfg.get("schedule", "step") == "step":
    # Update n starts at micro-batch n * k, so epoch e's first update is ceil(e * S / k); the
    # quotient of two integers is exact in float64 whenever it is a whole number.
    k = int(train_cfg.grad_accum_steps)
    boundaries = [math.ceil(e * steps_per_epoch / k) for e in train_cfg.lr_decay_epochs]
    factor = float(train_cfg.lr_decay_factor)

    def decayed(count: jax.Array) -> jax.Array:
      passed = sum((count >= b).astype(jnp.float32) for b in boundaries) if boundaries else 0.0
      return peak * jnp.power(factor, passed)
  else:
    def decayed(count: jax.Array) -> jax.Array:
      progress = jnp.clip((count - warmup) / (total - warmup), 0.0, 1.0)
      return peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))

  def schedule(count) -> jax.Array:
    count = jnp.asarray(count, jnp.float32)
    lr = decayed(count)
    if warmup > 0:
      lr = lr * jnp.minimum(count / warmup, 1.0)
    return jnp.asarray(lr, jnp.float32)

  return schedule


def weight_decay_mask(params: Any) -> Any:
  """True for the leaves that weight decay applies to: kernels only.

  Biases, LayerNorm scales and biases, the position embedding and the CLS token are excluded.
  Works on plain and on flax-boxed (`nn.LogicallyPartitioned`) trees: a box is one mask leaf.
  """
  def decays(path, _) -> bool:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(names) and names[-1] in DECAYED_PARAM_NAMES

  return jax.tree_util.tree_map_with_path(
      decays, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _top_names(path) -> list[str]:
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def _layer_of(names: Sequence[str], depth: int) -> int:
  """A param's layer: 0 before the blocks, i + 1 in block i, depth + 1 after them (norm, head)."""
  for name in names:
    match = _BLOCK_RE.match(name)
    if match:
      return int(match[1]) + 1
    if name in EMBEDDING_PARAM_NAMES:
      return 0
    if name in TOP_PARAM_NAMES:
      return depth + 1
  raise ValueError(f"parameter {'/'.join(names)} is neither embedding, block nor head: "
                   "add its name to optim.EMBEDDING_PARAM_NAMES or TOP_PARAM_NAMES")


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def model_depth(params: Any) -> int:
  """The number of encoder blocks (encoderblock_i) in a param tree."""
  found = [int(m[1]) for path, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]
           for m in map(_BLOCK_RE.match, _top_names(path)) if m]
  return max(found) + 1 if found else 0


def param_layers(params: Any) -> Any:
  """Each leaf's layer (see `_layer_of`): 0 embedding, 1..L blocks, L + 1 final norm and head."""
  depth = model_depth(params)
  return jax.tree_util.tree_map_with_path(lambda path, _: _layer_of(_top_names(path), depth),
                                          params, is_leaf=_is_box)


def trainable_mask(params: Any, trainable: str = "all") -> Any:
  """True for the leaves `config.train.trainable` trains; a flax box is one leaf.

  'head' is a linear probe: the head alone, the final norm frozen with the backbone.
  """
  blocks = parse_trainable(trainable)
  if blocks == 0:
    return jax.tree_util.tree_map_with_path(lambda path, _: _top_names(path)[:1] == ["head"],
                                            params, is_leaf=_is_box)
  if blocks is None:
    return jax.tree_util.tree_map(lambda _: True, params, is_leaf=_is_box)
  first = model_depth(params) + 1 - blocks   # the first trained layer
  return jax.tree_util.tree_map(lambda layer: layer >= first, param_layers(params))


def layer_scales(params: Any, decay: float) -> Any:
  """Each leaf's learning-rate factor: decay^(L + 1 - layer), so the head and final norm get 1.

  In a tree whose frozen leaves are masked out the depth comes from the last trained block, which
  is the model's last block whenever any block trains.
  """
  depth = model_depth(params)
  return jax.tree_util.tree_map(lambda layer: float(decay) ** (depth + 1 - layer),
                                param_layers(params))


def scale_by_layer(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its layer's factor (`layer_scales`), computed from the params."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    scales = layer_scales(updates, decay)

    def scale(s, u):
      if _is_box(u):
        return u.replace_boxed(u.unbox() * jnp.asarray(s, u.unbox().dtype))
      return u * jnp.asarray(s, u.dtype)

    return jax.tree_util.tree_map(scale, scales, updates, is_leaf=_is_box), state

  return optax.GradientTransformation(init, update)


def make_optimizer(train_cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """The recipe's optimiser; the trainer calls `update` once per micro-batch.

  clip_by_global_norm(grad_clip_norm) if > 0, then 'sgd' (momentum, PyTorch-style coupled weight
  decay added to the gradient before momentum) or 'adamw' (decoupled weight decay), both with
  `learning_rate_schedule` and decay on kernels only (`weight_decay_mask`). With
  grad_accum_steps k > 1 the whole chain is wrapped in `optax.MultiSteps`: the mean of k
  micro-batch gradients is clipped and applied on every k-th call, the other calls return zero
  updates, and the schedule (whose count lives in the inner state) counts real updates.

  `config.train.trainable` other than 'all' sends the frozen leaves through `optax.set_to_zero`
  (no state, no weight decay, no share of the clipping norm), so they never change; a
  `layer_decay` below 1 scales each trained leaf's update by `layer_scales`, after momentum or
  Adam, which is a per-layer learning rate (weight decay included).

  `init` accepts plain arrays and flax-boxed (`nn.LogicallyPartitioned`) params; with boxed params
  the state mirrors the boxes (momentum, Adam moments, accumulated gradients), so its shardings
  can be derived like the params' (then `nn.unbox` it). `update` takes gradients, state and
  params in the same form, boxed or not.

  Args:
    train_cfg: `config.train`.
    steps_per_epoch: train steps (micro-batches) per epoch; see `learning_rate_schedule`.
  """
  schedule = learning_rate_schedule(train_cfg, steps_per_epoch)
  weight_decay = float(train_cfg.weight_decay)
  if train_cfg.optimizer == "sgd":
    momentum = float(train_cfg.momentum)
    parts = []
    if weight_decay > 0:
      parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=False))
    tx = optax.chain(*parts)
  else:
    tx = optax.adamw(schedule, b1=ADAM_B1, b2=ADAM_B2, weight_decay=weight_decay,
                     mask=weight_decay_mask)
  decay = float(train_cfg.get("layer_decay", 1.0))
  if decay != 1.0:
    tx = optax.chain(tx, scale_by_layer(decay))
  if float(train_cfg.grad_clip_norm) > 0:
    # Before weight decay and momentum, as torch.nn.utils.clip_grad_norm_ before SGD.step().
    tx = optax.chain(optax.clip_by_global_norm(float(train_cfg.grad_clip_norm)), tx)
  trainable = train_cfg.get("trainable", "all")
  if trainable != "all":
    def labels(params):
      return jax.tree_util.tree_map(lambda t: "train" if t else "frozen",
                                    trainable_mask(params, trainable))
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  k = int(train_cfg.grad_accum_steps)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return tx


def update_count(opt_state: Any) -> jax.Array:
  """Optimiser updates applied so far: the count the learning-rate schedule sees.

  Read from the schedule's own `optax.ScaleByScheduleState`. With gradient accumulation the
  state is an `optax.MultiStepsState`, whose `gradient_step` is the same number and whose
  `mini_step` (0..k-1) is the position inside the current accumulation.
  """
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
           if isinstance(s, optax.ScaleByScheduleState)]
  if len(found) != 1:
    raise ValueError(f"expected one learning-rate schedule state in the optimiser state, "
                     f"found {len(found)}: is this a make_optimizer state?")
  return found[0].count


class AccumulationError(ValueError):
  """A checkpoint's unfinished accumulation does not fit the new accumulation count."""

  def __init__(self, message: str, pending: int):
    super().__init__(message)
    self.pending = pending


def change_accumulation(opt_state: Any, fresh_state: Any, old_k: int, new_k: int) -> Any:
  """A `make_optimizer` state of accumulation count `old_k` as one of count `new_k`.

  The optimiser's own state (momentum, Adam moments and their count) carries over as it is, and so
  do the micro-batches of an unfinished update with their mean gradient, which the next update
  then completes to `new_k`. The schedule's count becomes the updates a run with `new_k` would
  have made over the same micro-batches (to the nearest update), so the learning rate keeps to
  its epochs; the peak rate follows the new effective batch, as it does for a new batch size.
  `fresh_state` is `make_optimizer(new_k).init(params)`, whose accumulator (zeros) and structure
  the result takes where `opt_state` has none. Raises AccumulationError when the unfinished update
  already holds `new_k` micro-batches or more (with `new_k` = 1: any).
  """
  if old_k > 1:
    inner, pending = opt_state.inner_opt_state, int(jax.device_get(opt_state.mini_step))
    accumulated = opt_state.acc_grads
  else:
    inner, pending, accumulated = opt_state, 0, None
  if pending >= new_k:
    raise AccumulationError(f"the checkpoint holds {pending} micro-batch(es) of an unfinished update, "
                            f"which an update of {new_k} cannot complete", pending)
  updates = int(jax.device_get(update_count(inner)))
  count = int(round(updates * old_k / new_k))

  def recount(s):
    if isinstance(s, optax.ScaleByScheduleState):
      return s._replace(count=jnp.asarray(count, s.count.dtype))
    return s

  inner = jax.tree_util.tree_map(recount, inner,
                                 is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
  if new_k == 1:
    return inner
  return fresh_state._replace(
      mini_step=jnp.asarray(pending, fresh_state.mini_step.dtype),
      gradient_step=jnp.asarray(count, fresh_state.gradient_step.dtype),
      inner_opt_state=inner,
      acc_grads=fresh_state.acc_grads if accumulated is None else accumulated)


def current_learning_rate(train_cfg, steps_per_epoch: int, opt_state_or_step: Any) -> jax.Array:
  """The lr of the next optimiser update, from a `make_optimizer` state or an update count.

  Given a state after n updates this is schedule(n), the rate the (n+1)-th update will use;
  the rate of the update just applied is schedule(n - 1). Works under jit.
  """
  schedule = learning_rate_schedule(train_cfg, steps_per_epoch)
  if isinstance(opt_state_or_step, int) or hasattr(opt_state_or_step, "dtype"):
    return schedule(opt_state_or_step)
  return schedule(update_count(opt_state_or_step))


def classification_loss(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                        weights: jax.Array | None = None, label_mix: jax.Array | None = None,
                        mix_weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Label-smoothed softmax cross-entropy in float32: (weighted mean, per-example loss).

  Targets are (1 - label_smoothing) * onehot(label) + label_smoothing / num_classes. With
  mixup/cutmix, per-example loss = mix_weight * CE(labels) + (1 - mix_weight) * CE(label_mix).
  `weights` (e.g. a 0/1 mask of padded or dropped examples) weight the mean, which is 0 (with
  zero gradients) when they sum to 0. The per-example loss is returned unweighted.

  Args:
    logits: (..., num_classes), any float dtype.
    labels: (...) integer class indices.
    label_smoothing: in [0, 1).
    weights: (...) example weights; None weighs all equally.
    label_mix: (...) the second label of mixed examples; needs mix_weight.
    mix_weight: (...) or scalar weight of `labels` in mixed examples.
  """
  if (label_mix is None) != (mix_weight is None):
    raise ValueError("label_mix and mix_weight go together: pass both or neither")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # The smoothed-target CE without building the one-hot: the uniform part is the mean log-prob.
  smooth_term = label_smoothing * jnp.mean(logp, axis=-1)

  def cross_entropy(target: jax.Array) -> jax.Array:
    picked = jnp.take_along_axis(logp, target[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -((1.0 - label_smoothing) * picked + smooth_term)

  per_example = cross_entropy(labels)
  if label_mix is not None:
    w = jnp.asarray(mix_weight, jnp.float32)
    per_example = w * per_example + (1.0 - w) * cross_entropy(label_mix)
  if weights is None:
    return jnp.mean(per_example), per_example
  weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), per_example.shape)
  total = jnp.sum(jnp.where(weights != 0, per_example * weights, 0.0))
  denominator = jnp.sum(weights)
  # A safe denominator, not a where over a 0/0: that would still give NaN gradients.
  return total / jnp.where(denominator != 0, denominator, 1.0), per_example


def accuracy_counts(logits: jax.Array, labels: jax.Array,
                    weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Weighted counts (top-1 correct, top-5 correct); top-5 is top-C when C < 5 classes."""
  k = min(5, logits.shape[-1])
  _, top = jax.lax.top_k(logits.astype(jnp.float32), k)
  hits = top == labels[..., None]
  top1 = hits[..., 0].astype(jnp.float32)
  top5 = jnp.any(hits, axis=-1).astype(jnp.float32)
  if weights is None:
    return jnp.sum(top1), jnp.sum(top5)
  weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), top1.shape)
  return jnp.sum(top1 * weights), jnp.sum(top5 * weights)


def training_loss(train_cfg):
  """The train step's loss_fn(logits, batch) -> (loss, {'accuracy'}) for `config.train`.

  Label-smoothed cross-entropy; a batch that carries 'label_mix' and 'mix_weight' (mixup /
  CutMix, data/augment.py) mixes its two labels. The trainer and benchmarks/benchmark.py both use it.
  """
  def loss_fn(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    mixed = "label_mix" in batch
    loss, _ = classification_loss(
        logits, batch["label"], label_smoothing=train_cfg.label_smoothing,
        label_mix=batch["label_mix"] if mixed else None,
        mix_weight=batch["mix_weight"] if mixed else None)
    top1, _ = accuracy_counts(logits, batch["label"])
    return loss, {"accuracy": top1 / logits.shape[0]}
  return loss_fn
