"""The trainer: config -> mesh -> input -> model and state -> update loop -> checkpoints -> evaluation.

One code path for one CPU, one GPU and a TPU slice: every array lives on the config's device mesh,
each process feeds its share of the global batch, and the jitted steps do the rest.

    python -m msca_jax.main --config=configs/msca_kv.py:demo --workdir=/tmp/msca_kv_demo

A workdir holds checkpoints/ (orbax), tensorboard/, metrics.jsonl (one line per log or eval),
eval/ (JSON, per-video CSV, confusion plot) and, while a run trains there, LOCK (workdir.py). Rerunning
the same command resumes from the latest checkpoint, data stream included, after checking that the
checkpoint is of the same model (saved_config.py). SIGTERM or SIGINT saves and stops (exit 143 or 130).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.framework import summary_pb2

from msca_jax import models
from msca_jax.errors import UserError
from msca_jax.data import pipeline, sources
from msca_jax.data import stream as stream_lib
from msca_jax.data.pipeline import StreamState
from msca_jax.progress import Progress
from msca_jax.train import checkpoint as ckpt_lib
from msca_jax.train import evaluate, initialise, optim
from msca_jax.train import mesh as mesh_lib
from msca_jax.train import saved_config
from msca_jax.train import state as state_lib
from msca_jax.train import workdir as workdir_lib

MODES = ("train", "evaluate", "train_and_evaluate")
EXIT_INTERRUPTED = 143  # 128 + SIGTERM: stopped early with a checkpoint; rerun to resume
EXIT_SIGINT = 130  # 128 + SIGINT: the same, after Ctrl-C


class NonFiniteLossError(FloatingPointError):
  """The loss, the gradient or the state to save became NaN or Inf; stopped before saving it."""


@dataclasses.dataclass
class Experiment:
  """What a config describes, built once: devices, data, model, optimiser, state layout."""
  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  rules: tuple
  model: nn.Module
  clip: jax.ShapeDtypeStruct
  eval_source: sources.Source
  num_eval: int
  train_source: sources.Source | None = None
  num_train: int = 0
  steps_per_epoch: int = 0
  total_steps: int = 0
  tx: Any = None


# --------------------------------------------------------------------------------------- set-up

def _is_main() -> bool:
  return jax.process_index() == 0


def _log(message: str, *args) -> None:
  if _is_main():
    logging.info(message, *args)


def _source(config, split: str) -> sources.Source:
  """The split's source, made once: its classes checked against the model's, its videos counted."""
  source = sources.make_source(config.data, split, num_classes=config.model.num_classes)
  problems = getattr(getattr(source, "videos", None), "problems", ())
  if problems:
    logging.warning("%s: %d list lines skipped (a video each): %s%s", source.description,
                    len(problems), "; ".join(problems[:3]), " ..." if len(problems) > 3 else "")
  return source


def data_record(source: sources.Source) -> dict | None:
  """What inference needs of the training data when the data is not at hand (predict on another
  host): how its videos were decoded, and its class names. Saved with every checkpoint."""
  if source.decode is None:
    return None
  return {"decode": source.decode.as_json(), "class_names": list(source.class_names),
          "description": source.description}


def build(config, workdir: str, *, train: bool) -> Experiment:
  """Checks the config, builds the mesh, finds the data and logs what the run will do."""
  pipeline.check_config(config.data)
  optim.check_config(config.train)
  if train and (not isinstance(config.train.checkpoint_every_steps, int)
                or config.train.checkpoint_every_steps < 1):
    # 0 would save at every step (orbax's interval), and no periodic saves would lose work.
    raise UserError(f"config.train.checkpoint_every_steps: expected a positive number of steps "
                    f"between checkpoints, got {config.train.checkpoint_every_steps!r}")
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.rules(config.mesh)
  mesh_lib.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
  model = models.build(config.model)
  eval_source = _source(config, config.data.eval_split)
  exp = Experiment(config=config, workdir=workdir, mesh=mesh, rules=rules, model=model,
                   clip=models.clip_spec(config.model), eval_source=eval_source,
                   num_eval=eval_source.num_records)
  devices = jax.devices()
  _log("devices: %d x %s (%s), %d process(es), %d local", len(devices), devices[0].device_kind,
       devices[0].platform, jax.process_count(), jax.local_device_count())
  _log("mesh: %s", ", ".join(f"{k}={v}" for k, v in mesh.shape.items()))
  arch = models.architecture(config.model)
  _log("model: %s %s %s, temporal %s, %s compute, remat %s", config.model.name, config.model.variant,
       arch, model.temporal, config.model.dtype, config.model.remat)
  d = config.data
  _log("clips: %d frames (%s sampling, %s positions, stride %d at %d fps), %d px crops, %s to "
       "the devices", d.num_frames, d.sampling, d.clip_positions, d.stride, d.fps, d.image_size,
       d.dtype)
  if train:
    mesh_lib.check_batch_size(config.train.batch_size, mesh)
    exp.train_source = _source(config, config.data.train_split)
    exp.num_train = exp.train_source.num_records
    exp.steps_per_epoch = exp.num_train // config.train.batch_size
    if exp.steps_per_epoch == 0:
      raise UserError(f"config.train.batch_size = {config.train.batch_size} is larger than the "
                      f"{exp.num_train} training videos in {exp.train_source.description}")
    exp.total_steps = (config.train.num_steps if config.train.num_steps > 0
                       else config.train.num_epochs * exp.steps_per_epoch)
    exp.tx = optim.make_optimizer(config.train, exp.steps_per_epoch)
    t = config.train
    _log("train data: %s: %d videos, %d classes", exp.train_source.description, exp.num_train,
         exp.train_source.num_classes)
    _log("batch: %d clips per step globally, %d per device, %d per process; x%d accumulation = "
         "%d clips per update; peak lr %.4g (%s, %s schedule)", t.batch_size,
         t.batch_size // mesh_lib.batch_shards(mesh), t.batch_size // jax.process_count(),
         t.grad_accum_steps, optim.effective_batch_size(t), optim.peak_learning_rate(t), t.optimizer,
         t.schedule)
    _log("schedule: %d steps per epoch, %d steps (%.2f epochs)", exp.steps_per_epoch,
         exp.total_steps, exp.total_steps / exp.steps_per_epoch)
    _log("augmentation: short side %s, flip %.2f, colour %.2f, RandAugment %d, mixup %.2f, "
         "cutmix %.2f", tuple(d.train_short_side_range), d.flip_prob, d.color_prob,
         d.randaugment_layers, d.mixup_alpha, d.cutmix_alpha)
    if t.get("trainable", "all") != "all" or t.get("layer_decay", 1.0) != 1.0:
      _log("fine-tuning: trainable %s, layer decay %g", t.get("trainable", "all"),
           t.get("layer_decay", 1.0))
  _log("eval data: %s: %d videos; views: validation %d clip(s) x %d crop(s), test %d clip(s) x "
       "%d crop(s), short side %d", eval_source.description, exp.num_eval, d.val_clips, d.val_crops,
       d.eval_clips, d.eval_crops, d.eval_short_side)
  return exp


# ------------------------------------------------------------------------------------ metrics out

_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


class MetricsWriter:
  """TensorBoard scalars and metrics.jsonl in the workdir, written by process 0 only.

  A write that fails (a full disk, a lost permission) raises SaveError naming the cause in one
  line, as a failed checkpoint save does; `checkpoint_state()` (e.g. the checkpointer's
  last_finished) says what the checkpoints are then.
  """

  def __init__(self, workdir: str, checkpoint_state=None):
    self.enabled = _is_main()
    self.workdir = workdir
    self._checkpoint_state = checkpoint_state
    self._failed = False
    if self.enabled:
      self._guarded(lambda: tf.io.gfile.makedirs(workdir))
      self._tb = self._guarded(
          lambda: tf.summary.create_file_writer(os.path.join(workdir, "tensorboard")))
      self._jsonl = self._guarded(
          lambda: tf.io.gfile.GFile(os.path.join(workdir, "metrics.jsonl"), "a"))

  def _guarded(self, write):
    try:
      return write()
    except (tf.errors.OpError, OSError) as e:
      self._failed = True
      state = f"; the previous checkpoint ({self._checkpoint_state()}) is intact" if (
          self._checkpoint_state) else ""
      raise ckpt_lib.SaveError(f"writing the metrics in {self.workdir} failed: "
                               f"{ckpt_lib.failure_reason(e)}{state}") from e

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return

    def write():
      with self._tb.as_default(step=step):
        for name, value in scalars.items():
          # tf.summary.scalar's body, minus its import of the tensorboard package.
          tf.summary.write(name, tf.constant(value, tf.float32), metadata=_SCALAR_METADATA)
      self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
      self._jsonl.flush()
    self._guarded(write)

  def close(self) -> None:
    """Closes the files; after a failed write, quietly (that failure was reported)."""
    if not self.enabled:
      return
    reported = self._failed
    try:
      self._guarded(self._tb.close)
      self._guarded(self._jsonl.close)
    except ckpt_lib.SaveError:
      if not reported:
        raise


# ------------------------------------------------------------------------------------ evaluation

def run_evaluation(exp: Experiment, eval_step, params, *, num_clips: int, num_crops: int,
                   stop: ckpt_lib.StopSignal | None = None) -> evaluate.EvalAccumulator | None:
  """One exact pass over the eval split with the given views; every process gets the same result.

  None when `stop` was signalled during the pass (single process: the run stops at once).
  """
  config = exp.config
  local_batch = config.eval.batch_size // jax.process_count()
  videos = stream_lib.EvalStream(exp.eval_source, config.data, batch_size=local_batch,
                                 num_clips=num_clips, num_crops=num_crops,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  rows = mesh_lib.process_rows(exp.mesh, config.eval.batch_size)
  accumulator = evaluate.EvalAccumulator(exp.eval_source.num_classes, exp.eval_source.class_names)

  def add(out: dict, host: dict) -> None:
    out = jax.device_get(out)
    accumulator.add(out["logits"], out["label"], out["mask"], list(host["key"]), host["error"])

  progress = Progress(videos.num_batches, unit="batches", desc=f"eval {num_clips}x{num_crops} views",
                      min_interval_s=30.0) if _is_main() else None
  pending = None  # the previous batch's output: fetched after the next one is dispatched
  for batch in videos:
    if stop is not None and stop.requested and jax.process_count() == 1:
      if progress:
        progress.close()
      return None
    out = eval_step(params, mesh_lib.global_batch(batch.device, exp.mesh))
    if pending is not None:
      add(*pending)
    pending = (out, videos.gather_host(batch.host, rows))
    if progress:
      progress.update(1)
  if pending is not None:
    add(*pending)
  if progress:
    progress.close()
  return accumulator


def report_evaluation(exp: Experiment, accumulator: evaluate.EvalAccumulator, *, name: str,
                      step: int, num_clips: int, num_crops: int, writer: MetricsWriter | None,
                      table: bool, weights: str | None = None,
                      weights_step: int | None = None) -> dict[str, float]:
  """Writes the reports (process 0), logs the metrics and returns them as scalars.

  `weights` names where the weights came from when they are not the workdir's own (config.init),
  `weights_step` their training step there (None: not a training checkpoint of ours).
  """
  result = accumulator.result()
  protocol = {"num_clips": num_clips, "num_crops": num_crops, "split": exp.config.data.eval_split,
              "step": step}
  if weights is not None:
    protocol.update(step=weights_step, weights=weights)
  scalars = {f"{name}/{k}": v for k, v in result.metrics().items() if v is not None}
  scalars[f"{name}/num_videos"] = result.num_videos
  if exp.eval_source.num_classes % 2 == 0 and exp.config.data.source == "synthetic":
    # The synthetic classes come in time-reversed pairs: the paper's point in one number.
    scalars.update({f"{name}/{k}": v for k, v in evaluate.pair_accuracy(result.confusion).items()
                    if not math.isnan(v)})
  if _is_main():
    directory = os.path.join(exp.workdir, "eval", f"{name}_step{step}")
    evaluate.write_reports(directory, exp.config.data.eval_split, result, accumulator, protocol)
    what = f"{name} at step {step}" if weights is None else f"{name} of {_weights_text(weights, weights_step)}"
    if table:
      print(evaluate.format_summary_table(result, protocol, title=what), flush=True)
    logging.info("%s: %s (reports in %s)", what,
                 ", ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in scalars.items()), directory)
  if result.num_videos != exp.num_eval - result.num_skipped and _is_main():
    logging.warning("%s: evaluated %d videos + %d skipped, but the split has %d records", name,
                    result.num_videos, result.num_skipped, exp.num_eval)
  if writer:
    writer.write(step, scalars)
  return scalars


def _weights_text(weights: str, step: int | None) -> str:
  return weights + (f" (step {step})" if step is not None else "")


# ------------------------------------------------------------------------------------ training

def make_train_step(config, model: nn.Module, tx, shardings, mesh: jax.sharding.Mesh, rules,
                    window: int | None):
  """The trainer's jitted train step: config.train's loss (optim.training_loss) on the batches
  of config.data, views finished on the device when `window` is set (stream.training_window).

  With `config.train.trainable` other than 'all' the frozen leaves get no backward pass.
  benchmarks/benchmark.py times this very step.
  """
  trainable = config.train.get("trainable", "all")
  mask = None if trainable == "all" else optim.trainable_mask(shardings.params, trainable)
  return state_lib.make_train_step(model, tx, optim.training_loss(config.train), shardings, mesh,
                                   rules, inputs=stream_lib.model_inputs(config.data, window),
                                   trainable=mask)


def _initial_state(exp: Experiment, shardings) -> state_lib.TrainState:
  """Step 0: random, or from config.init (a report says what was loaded)."""
  abstract_params = jax.eval_shape(exp.model.init, jax.random.key(0), exp.clip)["params"]
  loaded = initialise.initial_params(exp.config.init, abstract_params)
  if loaded is None:
    state, _ = state_lib.create(exp.model, exp.tx, exp.clip, exp.mesh, exp.rules,
                                jax.random.key(exp.config.train.seed))
    _log("init: random (seed %d)", exp.config.train.seed)
    return state
  params, report = loaded
  _log("init: %s", report.summary())
  return state_lib.with_params(nn.unbox(params), exp.tx, shardings)


def _check_same_model(exp: Experiment, checkpointer: ckpt_lib.Checkpointer, abstract, step: int) -> None:
  """Refuses to resume a checkpoint of another model, naming the fields (or parameters) that differ."""
  step_directory = os.path.join(checkpointer.directory, str(step))
  hint = (f"rerun with the model it was trained with, or use another --workdir (to start from these "
          f"weights under another model use --config.init.checkpoint={exp.workdir})")
  saved = saved_config.read_model_config(step_directory)
  if saved is None:
    logging.warning("%s holds no saved config: resuming without checking that it is the same model",
                    step_directory)
  else:
    diffs = saved_config.differences(saved, exp.config.model)
    if diffs:
      raise UserError(f"{exp.workdir} holds a checkpoint of another model: "
                      f"{saved_config.describe(diffs, given_as='config given')}; {hint}")
  # The same config fields can still mean other shapes (a checkpoint saved before a field existed).
  saved_params = checkpointer.manager.item_metadata(step)["state"]["params"]
  saved_shapes = {"/".join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(
      dict(saved_params)).items()}
  wanted = {"/".join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(
      dict(abstract.params)).items()}
  mismatched = [f"{name} is {saved_shapes.get(name, 'missing')} in the checkpoint, "
                f"{shape} in the model" for name, shape in wanted.items()
                if saved_shapes.get(name) != shape]
  mismatched += [f"{name} {saved_shapes[name]} is in the checkpoint, not in the model"
                 for name in saved_shapes if name not in wanted]
  if mismatched:
    more = f" (and {len(mismatched) - 2} more)" if len(mismatched) > 2 else ""
    raise UserError(f"{exp.workdir} holds a checkpoint of another model: {'; '.join(mismatched[:2])}"
                    f"{more}; {hint}")


def _check_same_optimizer(exp: Experiment, checkpointer: ckpt_lib.Checkpointer, abstract,
                          step: int) -> int:
  """Refuses a config.train whose optimiser state has another structure than the checkpoint's.

  Returns the checkpoint's accumulation count (the given one when the checkpoint saved no config).
  """
  given_k = int(exp.config.train.grad_accum_steps)
  saved = saved_config.read_train_config(os.path.join(checkpointer.directory, str(step)))
  if saved is None:  # _check_same_model has warned
    return given_k
  diffs = saved_config.optimizer_differences(saved, exp.config.train, abstract.params,
                                             exp.steps_per_epoch)
  if diffs:
    values = "value" if len(diffs) == 1 else "values"
    raise UserError(
        f"{exp.workdir} holds a checkpoint whose optimiser state this config.train cannot continue: "
        f"{saved_config.describe(diffs, given_as='config given', group='train')}; rerun with the "
        f"checkpoint's {values}, or start a new run from its weights with "
        f"--config.init.checkpoint={exp.workdir} and another --workdir")
  saved_k = saved.get("grad_accum_steps", given_k)
  return saved_k if isinstance(saved_k, int) and not isinstance(saved_k, bool) and saved_k >= 1 else given_k


def _with_accumulation(train_cfg, k: int):
  train_cfg = train_cfg.copy_and_resolve_references()
  train_cfg.grad_accum_steps = k
  return train_cfg


def _change_accumulation(exp: Experiment, state, abstract, saved_k: int, step: int):
  """The restored state of accumulation count saved_k, continued with the config's count."""
  given_k = int(exp.config.train.grad_accum_steps)
  shardings = jax.tree.map(lambda x: x.sharding, abstract.opt_state)
  fresh = (jax.jit(exp.tx.init, out_shardings=shardings)(state.params) if given_k > 1 else None)
  try:
    opt_state = optim.change_accumulation(state.opt_state, fresh, saved_k, given_k)
  except optim.AccumulationError as e:
    raise UserError(
        f"{exp.workdir}: config.train.grad_accum_steps: {saved_k} in the checkpoint (step {step}), "
        f"{given_k} in the config given: {e}; rerun with a count above {e.pending}, or with "
        f"{saved_k} until a step that is a multiple of {saved_k}") from None
  _log("config.train.grad_accum_steps: %d in the checkpoint, %d now: the optimiser state carries "
       "over, the schedule continues at update %d", saved_k, given_k,
       int(jax.device_get(optim.update_count(opt_state))))
  return state.replace(opt_state=jax.device_put(opt_state, shardings))


def _resume(exp: Experiment, checkpointer: ckpt_lib.Checkpointer, abstract, step: int):
  _check_same_model(exp, checkpointer, abstract, step)
  saved_k = _check_same_optimizer(exp, checkpointer, abstract, step)
  target = abstract
  if (saved_k > 1) != (exp.config.train.grad_accum_steps > 1):
    # Accumulation on or off: the state on disk has (or lacks) optax.MultiSteps' wrapper.
    saved_tx = optim.make_optimizer(_with_accumulation(exp.config.train, saved_k), exp.steps_per_epoch)
    target, _ = state_lib.abstract_state(exp.model, saved_tx, exp.clip, exp.mesh, exp.rules)
  try:
    state, streams, metadata = checkpointer.restore(step, target, exp.mesh)
  except ValueError as e:
    if "tree structures do not match" not in str(e):
      raise
    # A checkpoint that saved no config (or one this version cannot build): orbax's own words.
    raise UserError(f"{exp.workdir} holds a checkpoint whose optimiser state has another structure "
                    f"than config.train gives (saved by another version, or with other "
                    f"config.train.optimizer, momentum, weight_decay, grad_clip_norm, layer_decay or "
                    f"trainable); rerun with the config.train it was trained with, or start a new run "
                    f"from its weights with --config.init.checkpoint={exp.workdir} and another "
                    f"--workdir") from None
  if saved_k != exp.config.train.grad_accum_steps:
    state = _change_accumulation(exp, state, abstract, saved_k, step)
  stream = stream_lib.resume_state(exp.train_source, streams, jax.process_index(),
                                   jax.process_count())
  if len(streams) != jax.process_count():
    _log("checkpoint written by %d processes, resuming with %d: the data stream continues where "
         "it was as a whole (%s), not in the same order", len(streams), jax.process_count(),
         "positions re-split" if exp.train_source.random_access else "the earliest saved epoch")
  if metadata.get("steps_per_epoch") not in (None, exp.steps_per_epoch):
    logging.warning("the checkpoint was trained with %s steps per epoch, the data now gives %d: "
                    "the learning-rate schedule changes", metadata["steps_per_epoch"],
                    exp.steps_per_epoch)
  _log("resumed from %s at step %d (stream position %d)", checkpointer.directory, step,
       stream.position)
  return state, stream


def _fetch_window(pending: list[tuple[int, dict]], last_good: int | None, directory: str,
                  config) -> dict:
  """Means of the window's metrics; raises NonFiniteLossError at the first bad step."""
  fetched = jax.device_get([m for _, m in pending])
  for (step, _), metrics in zip(pending, fetched):
    bad = [k for k in ("loss", "grad_norm") if not np.isfinite(metrics[k])]
    if bad:
      raise _nonfinite(f"{' and '.join(bad)} became {metrics[bad[0]]}", step, last_good, directory,
                       config)
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def nonfinite_advice(config) -> str:
  """What may keep a run finite, of the changes this config has not made yet."""
  t = config.train
  advice = [f"lower config.train.base_lr (now {t.base_lr:g})"]
  if float(t.grad_clip_norm) > 0:
    advice.append(f"lower config.train.grad_clip_norm (now {t.grad_clip_norm:g})")
  else:
    advice.append("clip the gradients (config.train.grad_clip_norm=1.0)")
  if float(t.warmup_epochs) == 0:
    advice.append("warm up (config.train.warmup_epochs=1)")
  if config.model.dtype != "float32":
    advice.append(f"compute in float32 (config.model.dtype='float32', now {config.model.dtype!r})")
  return ", ".join(advice[:-1]) + " or " + advice[-1]


def _nonfinite(what: str, step: int, last_good: int | None, directory: str,
               config) -> NonFiniteLossError:
  where = (f"the last good checkpoint is step {last_good} in {directory}"
           if last_good is not None else "no checkpoint was written")
  advice = nonfinite_advice(config)
  return NonFiniteLossError(f"{what} at step {step}; stopping before this state is saved ({where}). "
                            f"{advice[0].upper()}{advice[1:]}.")


def _stop_requested(stop: ckpt_lib.StopSignal, checkpointer: ckpt_lib.Checkpointer, step: int) -> bool:
  if jax.process_count() == 1:
    return stop.requested
  # Every process must call this at every step; it is True on all of them at the same step.
  return checkpointer.manager.reached_preemption(step)


def _stop_signal() -> ckpt_lib.StopSignal:
  # One process: our SIGTERM/SIGINT handler. Several: JAX's preemption service (started by
  # jax.distributed) catches the signal and makes every process agree on the step to stop at.
  return ckpt_lib.StopSignal(signals=() if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT))


def train(exp: Experiment, *, evaluate_at_end: bool,
          stop: ckpt_lib.StopSignal | None = None) -> dict[str, Any]:
  """Trains to exp.total_steps (resuming if the workdir has a checkpoint); returns final metrics.

  Returns {'step', 'interrupted', 'exit_status', 'train': last window's means, 'val': ..., 'test': ...}.
  `stop` (default: one installed here) turns signals into a save and an early return.
  """
  own_stop = stop is None
  stop = _stop_signal() if own_stop else stop
  config, mesh = exp.config, exp.mesh
  t = config.train
  abstract, shardings = state_lib.abstract_state(exp.model, exp.tx, exp.clip, mesh, exp.rules)
  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(exp.workdir, "checkpoints"), save_interval_steps=t.checkpoint_every_steps,
      max_to_keep=t.max_checkpoints, async_save=t.async_checkpoint)
  latest = checkpointer.latest_intact_step()  # damaged newer steps are set aside, with a warning
  if latest is not None:
    state, stream = _resume(exp, checkpointer, abstract, latest)
  else:
    state, stream = _initial_state(exp, shardings), StreamState()
  step = int(jax.device_get(state.step))
  last_saved = latest

  metadata = {"config": config.to_json_best_effort(), "steps_per_epoch": exp.steps_per_epoch,
              "total_steps": exp.total_steps, "data": data_record(exp.train_source)}
  train_step = make_train_step(config, exp.model, exp.tx, shardings, mesh, exp.rules,
                               stream_lib.training_window(config.data, exp.train_source))
  eval_step = state_lib.make_eval_step(exp.model, shardings, mesh, exp.rules)
  schedule = optim.learning_rate_schedule(t, exp.steps_per_epoch)
  eval_every = config.eval.every_epochs * exp.steps_per_epoch
  local_batch = t.batch_size // jax.process_count()
  batches = stream_lib.TrainStream(
      exp.train_source, config.data, batch_size=local_batch, seed=t.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), state=stream)
  rng = jax.random.key(t.seed)
  writer = MetricsWriter(exp.workdir, checkpoint_state=checkpointer.last_finished)
  result: dict[str, Any] = {"step": step, "interrupted": False, "exit_status": 0}
  progress = Progress(exp.total_steps, unit="steps", desc="train", initial=step,
                      min_interval_s=None) if _is_main() else None

  def save(force: bool) -> None:
    nonlocal last_saved
    # The loss and gradient checks see the state before its update; this sees what is saved.
    bad = ckpt_lib.nonfinite_parts(state)
    if bad:
      what = {"params": "the parameters", "opt_state": "the optimiser state"}
      raise _nonfinite(" and ".join(what[b] for b in bad) + " became NaN or Inf", step, last_saved,
                       checkpointer.directory, config)
    if checkpointer.save(step, state, ckpt_lib.streams_array(stream, mesh), metadata, force=force):
      last_saved = step

  try:
    pending: list[tuple[int, dict]] = []
    fields: dict[str, Any] = {}
    window_start, window_step = time.monotonic(), step

    def interrupted(where: str) -> None:
      result["interrupted"], result["exit_status"] = True, stop.exit_status
      _log("stopped by %s %s: rerun the same command to resume", stop.signal_name or
           "a preemption notice", where)

    if jax.process_count() == 1 and stop.requested:
      interrupted(f"during start-up, before step {step + 1} (nothing new to save)")
    while step < exp.total_steps and not result["interrupted"]:
      batch = mesh_lib.global_batch(next(batches).device, mesh)
      stream = batches.state
      state, metrics = train_step(state, batch, rng)
      step += 1
      pending.append((step, metrics))
      is_last = step == exp.total_steps
      stopping = _stop_requested(stop, checkpointer, step)
      saving = is_last or stopping or checkpointer.manager.should_save(step)
      evaluating = eval_every > 0 and step % eval_every == 0 and not (is_last and evaluate_at_end)
      if step % t.log_every_steps == 0 or saving or evaluating:
        means = _fetch_window(pending, last_saved, checkpointer.directory, config)  # syncs with the devices
        pending = []
        now = time.monotonic()
        steps_per_s = (step - window_step) / max(now - window_start, 1e-9)
        window_start, window_step = now, step
        scalars = {f"train/{k}": v for k, v in means.items()}
        scalars["train/lr"] = float(schedule(max(0, step - 1) // t.grad_accum_steps))
        scalars["perf/steps_per_s"] = steps_per_s
        scalars["perf/clips_per_s"] = steps_per_s * t.batch_size
        scalars.update({f"input/skipped_{k}": v for k, v in stream.skipped_by_reason().items()})
        scalars["epoch"] = step / exp.steps_per_epoch
        writer.write(step, scalars)
        result["train"] = means
        fields = {"loss": means["loss"], "lr": scalars["train/lr"],
                  "clips/s": round(scalars["perf/clips_per_s"], 1)}
      if progress:
        progress.update(1, **fields)
        fields = {}
      if saving:
        save(force=is_last or stopping)
      if stopping:
        interrupted(f"at step {step}; checkpoint saved")
        break
      if evaluating:
        accumulator = run_evaluation(exp, eval_step, state.params, num_clips=config.data.val_clips,
                                     num_crops=config.data.val_crops, stop=stop)
        if accumulator is None:
          if last_saved != step:
            save(force=True)
          interrupted(f"during validation at step {step}; checkpoint saved")
          break
        result["val"] = report_evaluation(
            exp, accumulator, name="val", step=step, num_clips=config.data.val_clips,
            num_crops=config.data.val_crops, writer=writer, table=False)
    if progress:
      progress.close()
    if latest is not None and step == latest and step >= exp.total_steps:
      _log("already trained to step %d", step)
    result["step"] = step
    if evaluate_at_end and not result["interrupted"]:
      checkpointer.wait()
      accumulator = run_evaluation(exp, eval_step, state.params, num_clips=config.data.eval_clips,
                                   num_crops=config.data.eval_crops, stop=stop)
      if accumulator is None:
        interrupted(f"during the test evaluation at step {step} (trained and saved)")
      else:
        result["test"] = report_evaluation(
            exp, accumulator, name="test", step=step, num_clips=config.data.eval_clips,
            num_crops=config.data.eval_crops, writer=writer, table=True)
  finally:
    # Handlers stay ours until the saves have finished: a second signal must not cut one short.
    try:
      checkpointer.close()   # a save that failed in the background raises here, its one line
    finally:
      try:
        writer.close()
      finally:
        if own_stop:
          stop.restore_handlers()
  return result


# ------------------------------------------------------------------------------------ evaluation only

def evaluate_checkpoint(exp: Experiment, stop: ckpt_lib.StopSignal | None = None) -> dict[str, Any]:
  """The test protocol on the workdir's latest parameters (or config.init's, if it has none).

  {'step', 'test': metrics, 'interrupted', 'exit_status'}. A signal (`stop`) ends the pass at the
  next batch with nothing written: an evaluation has no state worth saving, a rerun starts it over.
  """
  config = exp.config
  init, step, weights, weights_step = config.init, 0, None, None
  try:
    step_dir = initialise.step_dir(exp.workdir)
    init, step = {"vit_npz": "", "checkpoint": step_dir, "load_head": True}, int(os.path.basename(step_dir))
  except initialise.pretrained.WeightsError:
    weights, weights_step = initialise.source_of(config.init)
    # The reports are named by the step the weights were trained to, and say whose they are.
    step = weights_step or 0
    if weights is not None:  # else no weights at all: initial_params below says so
      _log("%s has no finished checkpoint: evaluating config.init's weights, %s", exp.workdir,
           _weights_text(weights, weights_step))
  abstract_params = jax.eval_shape(exp.model.init, jax.random.key(0), exp.clip)["params"]
  try:
    loaded = initialise.initial_params(init, abstract_params)
  except ckpt_lib.DamagedCheckpointError as e:
    if init is config.init:   # config.init's weights: as config.init reads them
      raise
    # The step, not the workdir, was read (no lock here: a trainer may publish a newer step).
    raise initialise.with_older_intact_step(e) from None
  if loaded is None:
    raise UserError(f"nothing to evaluate: {exp.workdir} has no finished checkpoint and "
                    "config.init names no weights (set --config.init.weights or --config.init.checkpoint)")
  params, report = loaded
  _log("evaluating %s", report.summary())
  param_shardings = mesh_lib.tree_shardings(abstract_params, exp.mesh, exp.rules)
  params = jax.device_put(nn.unbox(params), param_shardings)
  shardings = state_lib.TrainState(step=None, params=param_shardings, opt_state=None)
  eval_step = state_lib.make_eval_step(exp.model, shardings, exp.mesh, exp.rules)
  accumulator = run_evaluation(exp, eval_step, params, num_clips=config.data.eval_clips,
                               num_crops=config.data.eval_crops, stop=stop)
  if accumulator is None:
    _log("stopped by %s during the evaluation: nothing written; rerun the same command to evaluate",
         stop.signal_name or "a signal")
    return {"step": step, "test": {}, "interrupted": True, "exit_status": stop.exit_status}
  writer = MetricsWriter(exp.workdir)
  try:
    test = report_evaluation(exp, accumulator, name="test", step=step,
                             num_clips=config.data.eval_clips, num_crops=config.data.eval_crops,
                             writer=writer, table=True, weights=weights, weights_step=weights_step)
  finally:
    writer.close()
  return {"step": step, "test": test, "interrupted": False, "exit_status": 0}


def _lock_workdir(workdir: str) -> workdir_lib.WorkdirLock | None:
  """Process 0 takes WORKDIR/LOCK; every process raises UserError when it is held by another run."""
  lock, refusal = None, ""
  if _is_main():
    lock = workdir_lib.WorkdirLock(workdir)
    try:
      lock.acquire()
    except UserError as e:
      lock, refusal = None, str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if multihost_utils.broadcast_one_to_all(np.int32(bool(refusal))) and not refusal:
      refusal = f"{workdir} is in use by another run (process 0's log names it)"
  if refusal:
    raise UserError(refusal)
  return lock


def run(config, workdir: str, mode: str = "train_and_evaluate") -> dict[str, Any]:
  """Trains and/or evaluates; training modes hold WORKDIR/LOCK (evaluate only reads checkpoints)."""
  if mode not in MODES:
    raise UserError(f"--mode must be one of {MODES}, got {mode!r}")
  workdir_lib.check_workdir(workdir)
  stop = _stop_signal()  # from here: a signal during start-up stops the run before its first step
  if mode == "evaluate":
    try:
      return evaluate_checkpoint(build(config, workdir, train=False), stop)
    finally:
      stop.restore_handlers()
  lock = None
  try:
    lock = _lock_workdir(workdir)
    exp = build(config, workdir, train=True)
    return train(exp, evaluate_at_end=mode == "train_and_evaluate", stop=stop)
  finally:
    if lock is not None:
      lock.release()
    stop.restore_handlers()
