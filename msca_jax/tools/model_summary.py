r"""Builds a config's model, counts its parameters and FLOPs, and runs it on a clip.

    python -m msca_jax.tools.model_summary --config=configs/msca_kv.py:demo
    python -m msca_jax.tools.model_summary --config=configs/msca_kv.py --noforward

FLOPs are XLA's cost analysis of the forward pass for one clip (one view), so
they count every multiply and every add; the same table shows the frame-wise
ViT of the same size, which every variant must match.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from msca_jax import cli, models

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/msca_kv.py:demo.")
_FORWARD = flags.DEFINE_bool("forward", True, "Also compile and time a forward pass on a random clip.")
_BATCH = flags.DEFINE_integer("batch", 1, "Clips in the timed forward pass.")


def describe(model_config) -> dict:
  """Parameter count and forward FLOPs per clip of a model config, without running it."""
  model, clip, variables = models.abstract_variables(model_config)
  flops = jax.jit(model.apply).lower(variables, clip).cost_analysis()["flops"]
  return {"params": sum(x.size for x in jax.tree.leaves(nn.unbox(variables))), "flops": flops,
          "temporal": model.temporal, "arch": models.architecture(model_config)}


def time_forward(model_config, batch: int, repeats: int = 5) -> tuple[float, float, np.ndarray]:
  """(compile seconds, median seconds per forward, logits) on a random clip."""
  model = models.build(model_config)
  shape = models.clip_spec(model_config, batch).shape
  clip = jax.random.uniform(jax.random.key(1), shape, minval=-1, maxval=1)
  params = jax.jit(model.init)(jax.random.key(0), clip)
  start = time.perf_counter()
  forward = jax.jit(model.apply).lower(params, clip).compile()
  compile_s = time.perf_counter() - start
  logits = forward(params, clip).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    forward(params, clip).block_until_ready()
    times.append(time.perf_counter() - start)
  return compile_s, float(np.median(times)), np.asarray(logits)


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/msca_kv.py:demo")
  m = config.model
  vit_config = m.copy_and_resolve_references()
  vit_config.name = "vit"
  ours, vit = describe(m), describe(vit_config)
  t = ours["temporal"]
  mixing = {"none": "none (frame-wise)",
            "tokenshift": f"TokenShift, shift_div={t.shift_div}, boundary={t.boundary}",
            "msca": f"MSCA-{t.msca_targets.upper()} on the {t.msca_axis} axis, shift_div={t.shift_div}, "
                    f"boundary={t.boundary}"}[t.kind]
  print(f"model        {m.name} {m.variant} {ours['arch']}")
  moved = models.moved_fraction(t, ours["arch"])
  if t.kind != "none":
    mixing += (f"; {moved:.1%} of the {'CLS channels' if t.kind == 'tokenshift' else t.msca_axis + 's'} "
               "read other frames" if moved else "; MOVES NOTHING: this is the frame-wise ViT")
  print(f"temporal     {mixing}")
  print(f"clip         {m.num_frames} x {m.image_size} x {m.image_size} x 3, {m.num_classes} classes, "
        f"compute {m.dtype}, remat {m.remat}")
  print(f"{'':12} {'params':>14} {'GFLOPs/clip':>12}")
  print(f"{'this model':12} {ours['params']:>14,} {ours['flops'] / 1e9:>12.2f}")
  print(f"{'ViT':12} {vit['params']:>14,} {vit['flops'] / 1e9:>12.2f}")
  print(f"{'ratio':12} {ours['params'] / vit['params']:>14.4f} {ours['flops'] / vit['flops']:>12.4f}")
  if _FORWARD.value:
    compile_s, step_s, logits = time_forward(m, _BATCH.value)
    print(f"forward      batch {_BATCH.value} on {jax.devices()[0].platform}: compile {compile_s:.1f} s, "
          f"{step_s * 1e3:.1f} ms per call ({_BATCH.value / step_s:.1f} clips/s)")
    print(f"logits       shape {logits.shape}, first clip top-5 classes "
          f"{np.argsort(-logits[0])[:5].tolist()} (random weights)")


if __name__ == "__main__":
  cli.run(main)
