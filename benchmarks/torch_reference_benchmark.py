r"""The PyTorch reference of our models, and the time of its train step on the host it runs on.

    python -m benchmarks.torch_reference_benchmark                      # ViT-B/16 8x224, batch 1
    python -m benchmarks.torch_reference_benchmark --variant=msca_kv --threads=2 --json=out.json

The reference is the same semantics written the usual PyTorch way (docs/model.md):
the frames of a (B, T, H, W, 3) clip are folded into the batch and go through transformers'
`ViTModel` (pre-LN, exact GELU, LayerNorm eps 1e-6, the config of `--model_variant`); each frame's
CLS token goes through one linear head and the LOGITS are averaged over the T frames. For
`--variant=msca_kv` every layer's attention is replaced by `MSCAKVAttention`, the official
MSCA-KV rule: heads [0, fold) take K and V from frame t+1, the last fold heads from frame t-1,
fold = num_heads // shift_div, zeros outside the clip, Q never shifted.

The timed train step is the recipe's (docs/recipe.md), as msca_jax.train does it: float32,
`model.train()`, label-smoothed (0.1) cross-entropy, backward, `clip_grad_norm_(1.0)`, SGD with
momentum 0.9, `zero_grad`. It prints the median and minimum step time after warm-up, the
forward-only (`no_grad`) time and clips/s, and writes them as JSON with --json.

Weights in the reference PyTorch state-dict layout (docs/weights.md, what
`msca_jax.pretrained.load_torch_state_dict` reads) go in with `load_reference_state_dict`, so one
state dict drives both implementations (tests/benchmarks/test_torch_reference_benchmark.py).

torch and transformers are the `parity` extra: pip install -e '.[parity]'.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Mapping

from absl import app, flags
import numpy as np

try:
  import torch
  import transformers
  from torch import nn
  from torch.nn import functional as F
except ImportError as e:  # pragma: no cover - the parity extra is missing
  raise ImportError(f"torch_reference_benchmark needs torch and transformers "
                    f"(pip install -e '.[parity]'): {e}") from e

from msca_jax import cli, defaults, host_memory, models

VARIANTS = ("vit", "msca_kv")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
LN_EPSILON = 1e-6  # msca_jax.models.vit.LN_EPSILON, docs/model.md
ARCH_FIELDS = ("width", "depth", "num_heads", "mlp_dim")


# ----------------------------------------------------------------------------- the model

def vit_config(*, width: int, depth: int, num_heads: int, mlp_dim: int, patch_size: int,
               image_size: int, attn_implementation: str = "sdpa") -> "transformers.ViTConfig":
  """transformers' ViTConfig of our frame-wise backbone (no dropout, exact GELU, eps 1e-6)."""
  if attn_implementation not in ATTN_IMPLEMENTATIONS:
    raise ValueError(f"attn_implementation: expected one of {ATTN_IMPLEMENTATIONS}, "
                     f"got {attn_implementation!r}")
  return transformers.ViTConfig(
      hidden_size=width, num_hidden_layers=depth, num_attention_heads=num_heads,
      intermediate_size=mlp_dim, patch_size=patch_size, image_size=image_size, num_channels=3,
      hidden_act="gelu",  # transformers' "gelu" is the exact erf form ("gelu_new" is tanh)
      layer_norm_eps=LN_EPSILON, qkv_bias=True, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, attn_implementation=attn_implementation)


def shift_heads(x: torch.Tensor, num_frames: int, fold: int) -> torch.Tensor:
  """MSCA's head shift on (B*T, heads, tokens, head_dim), as the official MSCA-KV code does it.

  Heads [0, fold) take frame t+1, heads [H-fold, H) frame t-1, the others stay; frames outside
  the clip are zeros. fold = 0 returns x unchanged (all heads stay).
  """
  bt, h, n, d = x.shape
  x = x.view(bt // num_frames, num_frames, h, n, d)
  out = torch.zeros_like(x)
  out[:, :-1, :fold] = x[:, 1:, :fold]                  # from t+1
  out[:, 1:, h - fold:] = x[:, :-1, h - fold:]          # from t-1 (nothing when fold is 0)
  out[:, :, fold:h - fold] = x[:, :, fold:h - fold]     # unshifted heads
  return out.view(bt, h, n, d)


class MSCAKVAttention(nn.Module):
  """transformers' ViT attention with MSCA-KV: some heads take K and V from the next/previous frame.

  Parameters and their names are those of transformers' ViTAttention (>= 5: q_proj, k_proj,
  v_proj, o_proj); the input is (B*T, tokens, width) with the frames of a clip consecutive.
  """

  def __init__(self, config: "transformers.ViTConfig", num_frames: int, shift_div: int):
    super().__init__()
    width, self.num_heads = config.hidden_size, config.num_attention_heads
    self.head_dim = width // self.num_heads
    self.num_frames = num_frames
    self.fold = self.num_heads // shift_div
    self.eager = config._attn_implementation == "eager"
    self.q_proj = nn.Linear(width, width, bias=config.qkv_bias)
    self.k_proj = nn.Linear(width, width, bias=config.qkv_bias)
    self.v_proj = nn.Linear(width, width, bias=config.qkv_bias)
    self.o_proj = nn.Linear(width, width)

  def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    del args, kwargs  # no mask, no head mask: ViT attends to every token of its frame
    bt, n, width = hidden_states.shape
    if bt % self.num_frames:
      raise ValueError(f"{bt} frames in the batch is not a whole number of {self.num_frames}-frame clips")

    def heads(x):  # (B*T, tokens, width) -> (B*T, heads, tokens, head_dim)
      return x.view(bt, n, self.num_heads, self.head_dim).transpose(1, 2)

    q = heads(self.q_proj(hidden_states))
    k = shift_heads(heads(self.k_proj(hidden_states)), self.num_frames, self.fold)
    v = shift_heads(heads(self.v_proj(hidden_states)), self.num_frames, self.fold)
    if self.eager:
      weights = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1)
      out = weights @ v
    else:
      out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(bt, n, width)
    return self.o_proj(out), None  # (output, attention weights) like transformers' modules


def _layers(vit: "transformers.ViTModel"):
  """The encoder layers: `layers` in transformers >= 5, `encoder.layer` before."""
  return vit.layers if hasattr(vit, "layers") else vit.encoder.layer


class VideoClassifier(nn.Module):
  """(B, T, H, W, 3) clip in [-1, 1] -> (B, num_classes) logits, our VideoClassifier's semantics."""

  def __init__(self, config: "transformers.ViTConfig", *, num_frames: int, num_classes: int,
               variant: str = "vit", shift_div: int = defaults.SHIFT_DIV["msca"]):
    super().__init__()
    if variant not in VARIANTS:
      raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    self.variant, self.num_frames = variant, num_frames
    self.vit = transformers.ViTModel(config, add_pooling_layer=False)
    self.head = nn.Linear(config.hidden_size, num_classes)
    if variant == "msca_kv":
      for layer in _layers(self.vit):
        layer.attention = MSCAKVAttention(config, num_frames, shift_div)

  def forward(self, video: torch.Tensor) -> torch.Tensor:
    b, t, h, w, c = video.shape
    if t != self.num_frames:
      raise ValueError(f"the model was built for {self.num_frames} frames, the clip has {t}")
    frames = video.reshape(b * t, h, w, c).permute(0, 3, 1, 2)  # batch-major: frame b*T + t
    cls = self.vit(pixel_values=frames).last_hidden_state[:, 0]
    return self.head(cls).view(b, t, -1).mean(dim=1)  # per-frame logits, averaged


def build_model(variant: str = "vit", *, width: int, depth: int, num_heads: int, mlp_dim: int,
                patch_size: int, image_size: int, num_frames: int, num_classes: int,
                shift_div: int = defaults.SHIFT_DIV["msca"],
                attn_implementation: str = "sdpa") -> VideoClassifier:
  config = vit_config(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                      patch_size=patch_size, image_size=image_size,
                      attn_implementation=attn_implementation)
  return VideoClassifier(config, num_frames=num_frames, num_classes=num_classes, variant=variant,
                         shift_div=shift_div)


# ----------------------------------------------------------------------------- weights

def _attention_linears(attention: nn.Module) -> dict[str, nn.Linear]:
  if hasattr(attention, "q_proj"):  # transformers >= 5, and MSCAKVAttention
    return dict(query=attention.q_proj, key=attention.k_proj, value=attention.v_proj,
                out=attention.o_proj)
  return dict(query=attention.attention.query, key=attention.attention.key,  # transformers 4
              value=attention.attention.value, out=attention.output.dense)


def _mlp_linears(layer: nn.Module) -> dict[str, nn.Linear]:
  if hasattr(layer, "mlp"):  # transformers >= 5
    return dict(fc1=layer.mlp.fc1, fc2=layer.mlp.fc2)
  return dict(fc1=layer.intermediate.dense, fc2=layer.output.dense)  # transformers 4


def reference_parameters(model: VideoClassifier) -> dict[str, torch.Tensor]:
  """The model's parameters under their names in the reference layout (docs/weights.md)."""
  vit, e = model.vit, "transformer.embeddings."
  out = {e + "cls_token": vit.embeddings.cls_token,
         e + "position_embeddings": vit.embeddings.position_embeddings,
         e + "patch_embeddings.weight": vit.embeddings.patch_embeddings.projection.weight,
         e + "patch_embeddings.bias": vit.embeddings.patch_embeddings.projection.bias,
         "transformer.encoder.encoder_norm.weight": vit.layernorm.weight,
         "transformer.encoder.encoder_norm.bias": vit.layernorm.bias,
         "head.weight": model.head.weight, "head.bias": model.head.bias}
  for i, layer in enumerate(_layers(vit)):
    p = f"transformer.encoder.layer.{i}."
    modules = {"attention_norm": layer.layernorm_before, "ffn_norm": layer.layernorm_after}
    modules.update({f"attn.{k}": m for k, m in _attention_linears(layer.attention).items()})
    modules.update({f"ffn.{k}": m for k, m in _mlp_linears(layer).items()})
    for name, module in modules.items():
      out[p + name + ".weight"], out[p + name + ".bias"] = module.weight, module.bias
  return out


def load_reference_state_dict(model: VideoClassifier, state_dict: Mapping[str, Any]) -> None:
  """Copies a reference-layout state dict (numpy arrays or tensors) into the model, in place.

  Every parameter must be given with its exact shape; a missing or an extra key is an error.
  """
  params = reference_parameters(model)
  missing, extra = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
  if missing or extra:
    raise KeyError(f"reference state dict does not fit the model: missing {missing}, extra {extra}")
  with torch.no_grad():
    for name, param in params.items():
      value = torch.as_tensor(np.asarray(state_dict[name]), dtype=param.dtype)
      if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{name}: shape {tuple(value.shape)}, the model has {tuple(param.shape)}")
      param.copy_(value)


# ----------------------------------------------------------------------------- the benchmark

def make_train_step(model: VideoClassifier, *, lr: float, momentum: float = 0.9,
                    clip_norm: float = 1.0, label_smoothing: float = 0.1):
  """step(video, labels) -> loss: the recipe's train step, in place on the model."""
  optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
  model.train()

  def step(video: torch.Tensor, labels: torch.Tensor) -> float:
    logits = model(video)
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()

  return step


def _elapsed(fn) -> float:
  start = time.perf_counter()
  fn()   # each timed function returns once its work is done (CPU torch; Bench.train_once blocks)
  return time.perf_counter() - start


def _times(*fns, steps: int, warmup: int) -> list[list[float]]:
  """Times each of `fns` `steps` times after `warmup` calls. With several, every round calls
  each once and the order reverses every round, so machine noise falls on all alike."""
  for _ in range(warmup):
    for fn in fns:
      fn()
  times = [[] for _ in fns]
  for i in range(steps):
    order = list(range(len(fns)))
    for j in (order if i % 2 == 0 else order[::-1]):
      times[j].append(_elapsed(fns[j]))
  return times


def _jax_bench(variant: str, *, model_variant: str, frames: int, image_size: int, batch: int,
               num_classes: int, shift_div: int, arch_overrides: Mapping[str, int] | None):
  """msca_jax's train step of the same model, from configs/ (imported here: JAX loads only now)."""
  from benchmarks import benchmark as jax_benchmark

  overrides = {"train.grad_accum_steps": 1, "model.num_classes": num_classes,
               "model.dropout_rate": 0.0, "model.attention_dropout_rate": 0.0,
               "model.drop_path_rate": 0.0}
  if variant == "msca_kv":
    overrides["model.shift_div"] = shift_div
  overrides.update({f"model.{k}": v for k, v in (arch_overrides or {}).items()})
  config = jax_benchmark.variant_config(variant, None, overrides, batch=batch, dtype="float32",
                                        remat=False, frames=frames, image_size=image_size,
                                        model_variant=model_variant)
  return jax_benchmark.prepare(variant, config)


def _summary(times: list[float], batch: int) -> dict:
  median = statistics.median(times)
  return {"median_s": median, "min_s": min(times), "times_s": times, "clips_per_s": batch / median}


def benchmark(variant: str = "vit", *, model_variant: str = "B/16", frames: int = 8,
              image_size: int = 224, batch: int = 1, num_classes: int = 400,
              shift_div: int = defaults.SHIFT_DIV["msca"],
              steps: int = 5, warmup: int = 1, threads: int | None = None,
              attn_implementation: str = "sdpa", lr: float | None = None,
              arch_overrides: Mapping[str, int] | None = None, seed: int = 0,
              against_jax: bool = False) -> dict:
  """Times the reference train step and forward pass; returns the JSON record.

  With `against_jax`, msca_jax's own train step of the same model (benchmarks/benchmark.py's, the
  trainer's jitted step with grad_accum_steps 1, so that it too clips and updates every step) is
  built in this process and the two are timed in alternating rounds; the record's "msca_jax"
  entry holds its times and the median over rounds of msca_jax / PyTorch. XLA uses every core.
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
  threads = threads or os.cpu_count()
  torch.set_num_threads(threads)
  arch = models.architecture(dict(variant=model_variant, **(arch_overrides or {})))
  torch.manual_seed(seed)
  model = build_model(variant, **arch, image_size=image_size, num_frames=frames,
                      num_classes=num_classes, shift_div=shift_div,
                      attn_implementation=attn_implementation)
  generator = torch.Generator().manual_seed(seed)
  video = torch.rand((batch, frames, image_size, image_size, 3), generator=generator) * 2 - 1
  labels = torch.randint(0, num_classes, (batch,), generator=generator)
  # The recipe's rate for this batch (0.1 per 420 clips); the value does not change the time.
  step = make_train_step(model, lr=0.1 * batch / 420 if lr is None else lr)
  ours = None
  if against_jax:
    ours = _jax_bench(variant, model_variant=model_variant, frames=frames, image_size=image_size,
                      batch=batch, num_classes=num_classes, shift_div=shift_div,
                      arch_overrides=arch_overrides)
    train, ours_times = _times(lambda: step(video, labels), ours.train_once, steps=steps,
                               warmup=warmup)
  else:
    [train] = _times(lambda: step(video, labels), steps=steps, warmup=warmup)

  model.eval()
  with torch.no_grad():
    [forward] = _times(lambda: model(video), steps=steps, warmup=warmup)
  return {
      "implementation": "pytorch", "variant": variant, "model_variant": model_variant, "arch": arch,
      "frames": frames, "image_size": image_size, "batch": batch, "num_classes": num_classes,
      "shift_div": shift_div if variant == "msca_kv" else None,
      "moved_heads_each_way": arch["num_heads"] // shift_div if variant == "msca_kv" else 0,
      "dtype": "float32", "attn_implementation": attn_implementation,
      "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
      "torch_version": torch.__version__, "transformers_version": transformers.__version__,
      "machine": platform.machine(), "steps": steps, "warmup": warmup,
      "params": sum(p.numel() for p in model.parameters()),
      "train_step": _summary(train, batch), "forward": _summary(forward, batch),
      **({"msca_jax": {
          "train_step": _summary(ours_times, batch),
          "vs_pytorch": statistics.median(o / t for o, t in zip(ours_times, train)),
          "attention": ours.info["attention"]["resolved"], "devices": ours.info["devices"],
          "grad_accum_steps": 1}} if ours is not None else {}),
  }


def table(record: dict) -> str:
  a = record["arch"]
  lines = [f"PyTorch reference {record['variant']} {record['model_variant']} "
           f"(width {a['width']}, depth {a['depth']}, heads {a['num_heads']}), "
           f"{record['frames']}x{record['image_size']}, batch {record['batch']}, float32, "
           f"{record['threads']} threads, torch {record['torch_version']}, "
           f"attention {record['attn_implementation']}",
           f"{'':<12}{'median s':>10}{'min s':>10}{'clips/s':>10}"]
  for name in ("train_step", "forward"):
    r = record[name]
    lines.append(f"{name:<12}{r['median_s']:>10.3f}{r['min_s']:>10.3f}{r['clips_per_s']:>10.3f}")
  if "msca_jax" in record:
    ours = record["msca_jax"]
    r = ours["train_step"]
    lines.append(f"{'msca_jax':<12}{r['median_s']:>10.3f}{r['min_s']:>10.3f}{r['clips_per_s']:>10.3f}"
                 f"   train step, attention {ours['attention']}; msca_jax / PyTorch = "
                 f"{ours['vs_pytorch']:.3f} (median of alternating rounds)")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so that importing this module defines no flag."""
  flags.DEFINE_enum("variant", "vit", VARIANTS, "vit, or msca_kv (the paper's MSCA-KV).")
  flags.DEFINE_string("model_variant", "B/16", "ViT size/patch, e.g. B/16, Ti/16.")
  flags.DEFINE_integer("frames", 8, "Frames per clip.")
  flags.DEFINE_integer("image_size", 224, "Frame height and width.")
  flags.DEFINE_integer("batch", 1, "Clips per step.")
  flags.DEFINE_integer("num_classes", 400, "Classes of the head.")
  flags.DEFINE_integer("shift_div", defaults.SHIFT_DIV["msca"],
                       "MSCA-KV: num_heads // shift_div heads move each way.")
  flags.DEFINE_integer("steps", 5, "Timed steps (and timed forward passes).")
  flags.DEFINE_integer("warmup", 1, "Untimed steps (and forward passes) first.")
  flags.DEFINE_integer("threads", None, "torch.set_num_threads; default os.cpu_count().")
  flags.DEFINE_enum("attn_implementation", "sdpa", ATTN_IMPLEMENTATIONS,
                    "sdpa (torch's scaled_dot_product_attention) or eager (matmul, softmax, matmul).")
  for name in ARCH_FIELDS:
    flags.DEFINE_integer(name, None, f"Override the variant's {name} (small test models).")
  flags.DEFINE_bool("against_jax", False, "Also build msca_jax's train step of the same model and "
                    "time both in alternating rounds (prints the ratio).")
  flags.DEFINE_string("json", None, "Write the record to this JSON file.")


def main(argv):
  # The allocator settings of msca_jax's own runs, so that both sides are timed alike.
  print(host_memory.keep_freed_memory(), flush=True)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  overrides = {name: FLAGS[name].value for name in ARCH_FIELDS if FLAGS[name].value is not None}
  try:
    record = benchmark(FLAGS.variant, model_variant=FLAGS.model_variant, frames=FLAGS.frames,
                       image_size=FLAGS.image_size, batch=FLAGS.batch, num_classes=FLAGS.num_classes,
                       shift_div=FLAGS.shift_div, steps=FLAGS.steps, warmup=FLAGS.warmup,
                       threads=FLAGS.threads, attn_implementation=FLAGS.attn_implementation,
                       arch_overrides=overrides, against_jax=FLAGS.against_jax)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(table(record))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(record, f, indent=2)
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
