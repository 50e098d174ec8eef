r"""Attention maps of one video: where each layer's and head's CLS token looks, and the rollout.

    python -m msca_jax.tools.visualize --config=configs/msca_kv.py:demo --checkpoint=WORKDIR \
        --video=clip.mp4 --out=DIR [--views=test|val] [--view=0] [--frame=-1] [--tile=112]

The video is decoded and cut into the evaluation views exactly as `msca_jax.predict` does (msca_jax/inference.py); the
model runs on every view (the top-5 is the view-averaged prediction) and the attention
probabilities of view --view are drawn. DIR receives:

  heads.png     per layer (rows) and head (columns), the CLS-to-patch attention of frame --frame
                as a heatmap over the pixels its keys came from: for an MSCA head whose keys come
                from frame t+1 or t-1, that neighbouring frame (labelled 'keys t+1' / 'keys t-1');
                on the patch axis each patch cell shows the frame its key was taken from
                ('keys mixed'); a key outside the clip with boundary 'zero' is a zero vector, drawn
                grey ('keys 0': the head's attention there is uniform);
  heads.gif     the same grid for every frame of the clip;
  rollout.png   attention rollout (Abnar & Zuidema 2020): per layer the head-averaged attention
                plus the identity for the residual, rows renormalised, multiplied over layers on
                the clip's T x tokens graph (an MSCA head's weights are routed to the frame its
                values came from); the map is the frames' CLS rows averaged (the logits are a mean
                over frames), over every frame's patches;
  rollout.gif   each frame next to its rollout overlay;
  index.html    one page with the top-5 prediction and all the images (relative links);
  attention.npz the raw numbers: 'attention' (layers, T, heads, tokens, tokens), 'rollout'
                (T, grid, grid), 'key_offsets', 'value_offsets', 'view' (T, S, S, 3) uint8.

From Python, `attention_probabilities(config, params, views)` returns the logits and the
per-layer probabilities; `rollout(...)` the rollout matrix.
"""

from __future__ import annotations

import dataclasses
import html
import os
import sys
from typing import Sequence

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app, flags

from msca_jax import cli, inference
from msca_jax.data.errors import DataError

GREY = 96  # the colour of a key that is a zero vector (outside the clip)


class VisualizeError(inference.InferenceError):
  """An input of the visualisation (a flag value, the output directory) that cannot be used."""


# ---------------------------------------------------------------------------------------------
# The numbers.


def attention_probabilities(config, params, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """((V, C) logits, (layers, V, T, heads, tokens, tokens) float32 probabilities) of views."""
  import jax
  from msca_jax import models

  model_config = config.model.copy_and_resolve_references()
  model_config.remat = False  # inference: nothing to rematerialise, and sow stays outside a lift
  model = models.build(model_config)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
  logits, state = apply(params, views)
  blocks = state["intermediates"]["Transformer"]
  depth = len(blocks)
  probs = [blocks[f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]["attention"][0]
           for i in range(depth)]
  return np.asarray(logits, np.float32), np.stack([np.asarray(p, np.float32) for p in probs])


def source_offsets(model_config, num_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(query, key, value) offsets, each (tokens, heads) in {-1, 0, +1}: token k of head h of frame
  t reads its query / key / value from frame t + offset (MSCA; zeros for ViT and TokenShift)."""
  from msca_jax import models
  from msca_jax.models import msca

  temporal = models.temporal_mixing(model_config)
  heads = models.architecture(model_config)["num_heads"]
  none = np.zeros((num_tokens, heads), np.int8)
  if temporal.kind != "msca":
    return none, none, none
  pattern = msca.offsets(temporal.msca_axis, num_tokens=num_tokens, num_heads=heads,
                         shift_div=temporal.shift_div)
  moved = np.broadcast_to(pattern[..., 0], (num_tokens, heads)).astype(np.int8)
  return tuple(moved if name in temporal.msca_targets else none for name in "qkv")


def _source_frame(t: int, offset: int, num_frames: int, boundary: str) -> int | None:
  """The frame t + offset reads, or None for the zeros outside a clip with boundary 'zero'."""
  s = t + int(offset)
  if 0 <= s < num_frames:
    return s
  return s % num_frames if boundary == "circular" else None


def rollout(attention: np.ndarray, value_offsets: np.ndarray, boundary: str = "zero") -> np.ndarray:
  """Attention rollout over the clip's (T * tokens) token graph, (T*N, T*N), row = output token.

  attention: (layers, T, heads, N, N) of one view. Per layer the heads' weights are averaged after
  routing each key column to the frame its value came from (values outside a 'zero' clip carry
  nothing), the identity is added with weight 1/2 for the residual path and rows are renormalised.
  """
  layers, frames, heads, tokens, _ = attention.shape
  total = frames * tokens
  result = np.eye(total)
  for layer in range(layers):
    flow = np.zeros((total, total))
    for t in range(frames):
      for h in range(heads):
        for k in range(tokens):
          s = _source_frame(t, value_offsets[k, h], frames, boundary)
          if s is not None:
            flow[t * tokens:(t + 1) * tokens, s * tokens + k] += attention[layer, t, h, :, k]
    flow /= heads
    flow = 0.5 * flow + 0.5 * np.eye(total)
    flow /= flow.sum(axis=1, keepdims=True)
    result = flow @ result
  return result


def clip_rollout_map(matrix: np.ndarray, frames: int, tokens: int) -> np.ndarray:
  """(T, grid, grid): the frames' CLS rows of a rollout, averaged, over each frame's patches."""
  rows = matrix.reshape(frames, tokens, frames, tokens)[:, 0]      # (T_out, T_in, tokens)
  mass = rows.mean(axis=0)[:, 1:]                                   # (T_in, patches)
  grid = int(round(np.sqrt(tokens - 1)))
  return mass.reshape(frames, grid, grid)


# ---------------------------------------------------------------------------------------------
# The pictures.


def _offset_name(offset: int) -> str:
  return "t" if offset == 0 else f"t{offset:+d}"


def head_label(layer: int, head: int, key_offsets: np.ndarray, query_offsets: np.ndarray, t: int,
               frames: int, boundary: str) -> str:
  """E.g. 'L1 H0  keys  t+1', 'L0 H3  keys  0' (zeros outside the clip), 'L0 H0  keys  mixed'
  (double spaces: PIL's default bitmap font draws a single space very narrow)."""
  patch_keys = set(key_offsets[1:, head].tolist())
  if len(patch_keys) > 1:
    keys = "keys  mixed"
  else:
    offset = patch_keys.pop()
    keys = ("keys  0" if _source_frame(t, offset, frames, boundary) is None
            else f"keys  {_offset_name(offset)}")
  query = f"  q  {_offset_name(int(query_offsets[0, head]))}" if query_offsets[0, head] else ""
  return f"L{layer} H{head}  {keys}{query}"


def _colormap():
  from matplotlib import colormaps
  return colormaps["inferno"]


def _upscale(image: np.ndarray, size: int, resample: str = "bilinear") -> np.ndarray:
  from PIL import Image
  mode = Image.Resampling.NEAREST if resample == "nearest" else Image.Resampling.BILINEAR
  if image.dtype != np.uint8:
    return np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), mode))
  return np.asarray(Image.fromarray(image).resize((size, size), mode))


def overlay(frame: np.ndarray, heat: np.ndarray, size: int, alpha: float = 0.6) -> np.ndarray:
  """uint8 (size, size, 3): the frame with a min-max normalised heatmap (grid, grid) over it."""
  low, high = float(heat.min()), float(heat.max())
  scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
  colours = _colormap()(_upscale(scaled, size, "nearest"))[..., :3] * 255.0
  base = _upscale(frame, size).astype(np.float32)
  return np.clip((1 - alpha) * base + alpha * colours, 0, 255).astype(np.uint8)


def key_background(view: np.ndarray, t: int, head: int, key_offsets: np.ndarray,
                   boundary: str, patch: int) -> np.ndarray:
  """Frame t's (S, S, 3) pixels with each patch cell taken from the frame its key came from."""
  frames, size = view.shape[0], view.shape[1]
  grid = size // patch
  image = np.empty_like(view[t])
  for p in range(grid * grid):
    s = _source_frame(t, key_offsets[p + 1, head], frames, boundary)
    y, x = (p // grid) * patch, (p % grid) * patch
    image[y:y + patch, x:x + patch] = GREY if s is None else view[s, y:y + patch, x:x + patch]
  return image


def _labelled(tile: np.ndarray, text: str, height: int = 14) -> np.ndarray:
  from PIL import Image, ImageDraw
  canvas = Image.new("RGB", (tile.shape[1], tile.shape[0] + height), (255, 255, 255))
  canvas.paste(Image.fromarray(tile), (0, height))
  ImageDraw.Draw(canvas).text((2, 1), text, fill=(0, 0, 0))
  return np.asarray(canvas)


def _grid(tiles: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
  rows = []
  for row in tiles:
    h, w = row[0].shape[:2]
    line = np.full((h, len(row) * (w + gap) - gap, 3), 255, np.uint8)
    for i, tile in enumerate(row):
      line[:, i * (w + gap):i * (w + gap) + w] = tile
    rows.append(line)
  width = max(r.shape[1] for r in rows)
  out = np.full((sum(r.shape[0] for r in rows) + gap * (len(rows) - 1), width, 3), 255, np.uint8)
  y = 0
  for r in rows:
    out[y:y + r.shape[0], :r.shape[1]] = r
    y += r.shape[0] + gap
  return out


def heads_grid(view, attention, t: int, key_offsets, query_offsets, boundary: str, patch: int,
               tile: int) -> np.ndarray:
  """Layers x heads tiles of frame t's CLS-to-patch attention over the keys' pixels."""
  layers, frames, heads, tokens, _ = attention.shape
  grid = int(round(np.sqrt(tokens - 1)))
  rows = []
  for layer in range(layers):
    row = []
    for h in range(heads):
      heat = attention[layer, t, h, 0, 1:].reshape(grid, grid)
      background = key_background(view, t, h, key_offsets, boundary, patch)
      row.append(_labelled(overlay(background, heat, tile),
                           head_label(layer, h, key_offsets, query_offsets, t, frames, boundary)))
    rows.append(row)
  return _grid(rows)


def _save_gif(path: str, images: list[np.ndarray], fps: float) -> None:
  from PIL import Image
  frames = [Image.fromarray(image) for image in images]
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / max(fps, 1)),
                 loop=0)


def _save_png(path: str, image: np.ndarray) -> None:
  from PIL import Image
  Image.fromarray(image).save(path, optimize=True)


@dataclasses.dataclass
class Written:
  """What `write_visualization` wrote: the output directory and its files by name."""
  out: str
  files: dict[str, str]


def write_visualization(out: str, view: np.ndarray, attention: np.ndarray, config,
                        top: Sequence[tuple[int, str, float]], *, frame: int = -1, tile: int = 112,
                        title: str = "", details: Sequence[str] = ()) -> Written:
  """Writes the images, the page and the numbers for one view (T, S, S, 3) uint8 and its
  attention (layers, T, heads, tokens, tokens) into `out`."""
  from msca_jax import models

  layers, frames, heads, tokens, _ = attention.shape
  if not -frames <= frame < frames:
    raise VisualizeError(f"--frame {frame}: the clip has {frames} frames (expected 0..{frames - 1}, "
                         "or -1 for the middle one)")
  t = frames // 2 if frame == -1 else frame % frames
  boundary = models.temporal_mixing(config.model).boundary
  patch = models.architecture(config.model)["patch_size"]
  query_offsets, key_offsets, value_offsets = source_offsets(config.model, tokens)
  os.makedirs(out, exist_ok=True)
  files = {}

  def path(name):
    files[name] = os.path.join(out, name)
    return files[name]

  grids = [heads_grid(view, attention, s, key_offsets, query_offsets, boundary, patch, tile)
           for s in range(frames)]
  _save_png(path("heads.png"), grids[t])
  _save_gif(path("heads.gif"), grids, fps=2)
  matrix = rollout(attention, value_offsets, boundary)
  rolled = clip_rollout_map(matrix, frames, tokens)
  pairs = [_labelled(_upscale(view[s], tile), f"frame {s}") for s in range(frames)]
  overlays = [_labelled(overlay(view[s], rolled[s], tile), f"rollout {s}") for s in range(frames)]
  _save_png(path("rollout.png"), _grid([pairs, overlays]))
  _save_gif(path("rollout.gif"), [_grid([[a, b]]) for a, b in zip(pairs, overlays)], fps=2)
  np.savez_compressed(path("attention.npz"), attention=attention, rollout=rolled,
                      key_offsets=key_offsets, value_offsets=value_offsets,
                      query_offsets=query_offsets, view=view)
  _write_page(path("index.html"), config, top, t, title, details)
  return Written(out=out, files=files)


def _write_page(path: str, config, top, t: int, title: str, details: Sequence[str]) -> None:
  from msca_jax import models
  m = config.model
  temporal = models.temporal_mixing(m)
  if temporal.kind == "msca":
    model = (f"MSCA-{temporal.msca_targets.upper()} ({temporal.msca_axis} axis, shift_div "
             f"{temporal.shift_div}, boundary {temporal.boundary})")
  else:
    model = {"none": "frame-wise ViT", "tokenshift": "TokenShift"}[temporal.kind]
  rows = "".join(f"<tr><td>{rank}</td><td>{html.escape(name)}</td><td>{prob:.4f}</td>"
                 f"<td>{index}</td></tr>" for rank, (index, name, prob) in enumerate(top, 1))
  items = "".join(f"<li>{html.escape(line)}</li>" for line in details)
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Attention: {html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:1em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px}}
img{{max-width:100%;image-rendering:pixelated}}</style></head><body>
<h1>Attention maps: {html.escape(title)}</h1>
<p>Model: {html.escape(model)}, {models.architecture(m)['depth']} layers x
{models.architecture(m)['num_heads']} heads.</p>
<ul>{items}</ul>
<h2>Top-{len(top)} prediction (all views averaged)</h2>
<table><tr><th>rank</th><th>class</th><th>probability</th><th>index</th></tr>{rows}</table>
<h2>Per layer and head, frame {t}</h2>
<p>Each tile is the CLS token's attention to the patches, drawn over the pixels its keys came
from. 'keys t+1' / 'keys t-1': an MSCA head that reads the keys of the next / previous frame;
'keys mixed': the patch axis, where each patch cell shows the frame its key came from;
'keys 0': the keys are the zeros outside the clip, so the attention is uniform (grey).
Heatmaps are normalised per tile.</p>
<img src="heads.png" alt="heads"><h3>Every frame</h3><img src="heads.gif" alt="heads over time">
<h2>Attention rollout (Abnar &amp; Zuidema 2020)</h2>
<p>Head-averaged attention with the residual identity averaged in, multiplied over the layers on
the clip's frames x tokens graph (MSCA weights routed to the frame their values came from); the
map is the CLS rows of all frames averaged, over each frame's patches.</p>
<img src="rollout.png" alt="rollout"><img src="rollout.gif" alt="rollout over time">
<p>Raw numbers: <a href="attention.npz">attention.npz</a></p>
</body></html>
"""
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)


# ---------------------------------------------------------------------------------------------
# The command line.


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 argv: Sequence[str] | None = None) -> flags.FlagValues:
  """The model and video flags of every inference program, plus where to write and what to draw."""
  inference.define_model_flags(flag_values, argv)
  inference.define_video_flags(flag_values)
  flags.DEFINE_string("out", None, "Directory for the images, the page and attention.npz.",
                      flag_values=flag_values)
  flags.DEFINE_integer("view", 0, "Which evaluation view to draw (clip-major: clip * crops + "
                       "crop).", flag_values=flag_values)
  flags.DEFINE_integer("frame", -1, "The frame of heads.png; -1: the middle one.",
                       flag_values=flag_values)
  flags.DEFINE_integer("tile", 112, "Side of one heatmap in pixels.", flag_values=flag_values)
  return flag_values


def _check_required(flag_values: flags.FlagValues) -> None:
  if (flag_values.config is None or not flag_values.checkpoint or not flag_values.video
      or not flag_values.out):
    raise app.UsageError("--config, --checkpoint, --video and --out are required, e.g. "
                         "--config=configs/msca_kv.py:demo --checkpoint=WORKDIR --video=clip.mp4 "
                         "--out=DIR")


def run(flag_values: flags.FlagValues, out=None) -> int:
  """The command: writes the visualisation, prints where; returns EXIT_USER_ERROR (one line on
  stderr) for a mistake in the inputs."""
  _check_required(flag_values)
  from msca_jax.data import video
  from msca_jax.train import evaluate

  out = out or sys.stdout
  config = flag_values.config

  def fail(message: str) -> int:
    print(f"visualize: error: {cli.one_line(message)}", file=sys.stderr)
    return cli.EXIT_USER_ERROR

  if not os.path.isfile(flag_values.video):
    return fail(f"--video {flag_values.video}: no such file")
  if flag_values.tile < 16:
    return fail(f"--tile must be at least 16 pixels, got {flag_values.tile}")
  if os.path.exists(flag_values.out) and not os.path.isdir(flag_values.out):
    return fail(f"--out {flag_values.out}: exists and is not a directory")
  try:
    clips, crops = inference.view_counts(config.data, flag_values.views)
    if not 0 <= flag_values.view < clips * crops:
      raise VisualizeError(f"--view {flag_values.view}: the {flag_values.views} protocol has "
                           f"{clips * crops} views (expected 0..{clips * crops - 1})")
    model = inference.load_model(config, flag_values.checkpoint, labels=flag_values.labels,
                                 short_side=flag_values.short_side,
                                 jpeg_quality=flag_values.jpeg_quality)
    decode, names, params = model.decode, model.names, model.params
    frames = inference.decode_video(flag_values.video, decode)
    views = inference.eval_views(frames, config.data, flag_values.views)
  except video.VideoError as e:
    return fail(f"--video: {e}")
  except (OSError, inference.InferenceError, DataError) as e:
    return fail(str(e))
  logits, attention = attention_probabilities(config, params, views)
  probabilities = evaluate.softmax(np.asarray(evaluate.average_views(logits[None]))[0])
  top = inference.top_classes(probabilities, names, flag_values.top_k)
  details = [f"video {flag_values.video}: {len(frames)} frames decoded at {decode.describe()}",
             f"views: {inference.describe_protocol(config.data, flag_values.views)}; drawn: view "
             f"{flag_values.view}",
             f"checkpoint {flag_values.checkpoint}"]
  try:
    written = write_visualization(flag_values.out, views[flag_values.view],
                                  attention[:, flag_values.view], config, top,
                                  frame=flag_values.frame, tile=flag_values.tile,
                                  title=os.path.basename(flag_values.video), details=details)
  except VisualizeError as e:
    return fail(str(e))
  except OSError as e:
    return fail(f"--out {flag_values.out}: cannot write ({e.strerror or e})")
  print(f"top-{len(top)}: " + ", ".join(f"{name} {prob:.3f}" for _, name, prob in top), file=out)
  for name in sorted(written.files):
    print(f"wrote {written.files[name]}", file=out)
  return 0


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _check_required(flags.FLAGS)
  inference.start_program(flags.FLAGS)
  return run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
