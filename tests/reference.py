"""Independent NumPy reference for the msca_jax parity tests.

This module is a deliberately plain re-statement of docs/model.md and docs/weights.md
(frame-wise ViT, TokenShift, MSCA, pretrained-weight layouts). It is used as GROUND TRUTH
by the parity tests of the JAX/Flax package, so it:

* shares no code with ``msca_jax`` (it was written without reading it);
* computes everything in float64 with plain NumPy (loops over layers and heads, explicit
  einsums, exact-erf GELU, LayerNorm eps 1e-6);
* implements the temporal shifts the way the authors' PyTorch code does: explicit slicing
  into a zeros array (``out[:, :-1] = x[:, 1:]`` ...) for the zero boundary, ``np.roll``
  only for the circular boundary, with a separate, spelled-out function for every kind of
  shift (TokenShift CLS shift, MSCA head-axis shift, MSCA patch-axis shift);
* uses the reference PyTorch state-dict layout of docs/weights.md (``transformer.embeddings...``,
  ``transformer.encoder.layer.{i}...``, ``head.*``; Linear weights are (out, in), the patch
  conv weight is OIHW).

Only NumPy is imported at module import time (scipy is imported lazily for ``erf`` and a
``math.erf`` fallback is used when scipy is absent).

Public functions:
    random_state_dict(seed, *, width, depth, num_heads, mlp_dim, patch_size, grid,
                      num_classes, scale=1.0) -> dict[str, np.ndarray]
    forward(sd, video, *, num_heads, model='vit', shift_div=4, msca_targets='kv',
            msca_axis='head', boundary='zero', return_frame_logits=False, capture=None,
            clip=False)
    to_google_npz(sd, *, num_heads, style) -> dict[str, np.ndarray]
    hf_vit_to_reference(hf_sd) -> dict[str, np.ndarray]
"""

from __future__ import annotations

import math
import re

import numpy as np

LN_EPS = 1e-6

# Fake class counts of the heads that the Google checkpoints carry and that loaders must drop.
I21K_FAKE_CLASSES = 37        # stands in for 21843 (all-zero head, with pre_logits)
AUGREG_FAKE_CLASSES = 11      # stands in for e.g. 1000 (non-zero head, no pre_logits)
BIG_VISION_FAKE_CLASSES = 13  # another class count (non-zero head, no pre_logits)

GOOGLE_STYLES = ("i21k", "augreg", "big_vision", "opt_target")


# --------------------------------------------------------------------------------------
# Random reference-layout state dict
# --------------------------------------------------------------------------------------

def _block_keys(i):
    p = f"transformer.encoder.layer.{i}."
    return [
        p + "attention_norm.weight", p + "attention_norm.bias",
        p + "attn.query.weight", p + "attn.query.bias",
        p + "attn.key.weight", p + "attn.key.bias",
        p + "attn.value.weight", p + "attn.value.bias",
        p + "attn.out.weight", p + "attn.out.bias",
        p + "ffn_norm.weight", p + "ffn_norm.bias",
        p + "ffn.fc1.weight", p + "ffn.fc1.bias",
        p + "ffn.fc2.weight", p + "ffn.fc2.bias",
    ]


def random_state_dict(seed, *, width, depth, num_heads, mlp_dim, patch_size, grid,
                      num_classes, scale=1.0):
    """A random float32 state dict in the reference PyTorch layout (docs/weights.md).

    Every tensor is random (LayerNorm scales and all biases included) so that no bug can
    hide behind zeros or ones. Magnitudes keep activations and logits O(1):
      LayerNorm weight 1 + 0.1*s*N(0,1), LayerNorm bias 0.1*s*N(0,1),
      Linear / conv weight s*N(0,1)/sqrt(fan_in), Linear / conv bias 0.1*s*N(0,1),
      cls token and position embedding 0.5*s*N(0,1),
    where s = ``scale`` (it scales every random deviation).
    """
    if width % num_heads != 0:
        raise ValueError(f"width {width} not divisible by num_heads {num_heads}")
    gh, gw = grid
    p = patch_size
    rng = np.random.default_rng(seed)
    s = float(scale)
    sd = {}

    def normal(shape, std):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def ln(prefix):
        sd[prefix + ".weight"] = (1.0 + 0.1 * s * rng.standard_normal((width,))).astype(np.float32)
        sd[prefix + ".bias"] = normal((width,), 0.1 * s)

    def linear(prefix, out_f, in_f):
        sd[prefix + ".weight"] = normal((out_f, in_f), s / math.sqrt(in_f))
        sd[prefix + ".bias"] = normal((out_f,), 0.1 * s)

    e = "transformer.embeddings."
    sd[e + "position_embeddings"] = normal((1, 1 + gh * gw, width), 0.5 * s)
    sd[e + "cls_token"] = normal((1, 1, width), 0.5 * s)
    sd[e + "patch_embeddings.weight"] = normal((width, 3, p, p), s / math.sqrt(3 * p * p))
    sd[e + "patch_embeddings.bias"] = normal((width,), 0.1 * s)
    for i in range(depth):
        b = f"transformer.encoder.layer.{i}."
        ln(b + "attention_norm")
        linear(b + "attn.query", width, width)
        linear(b + "attn.key", width, width)
        linear(b + "attn.value", width, width)
        linear(b + "attn.out", width, width)
        ln(b + "ffn_norm")
        linear(b + "ffn.fc1", mlp_dim, width)
        linear(b + "ffn.fc2", width, mlp_dim)
    ln("transformer.encoder.encoder_norm")
    linear("head", num_classes, width)
    return sd


# --------------------------------------------------------------------------------------
# Elementary ops (float64)
# --------------------------------------------------------------------------------------

def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _erf(x):
    try:
        from scipy.special import erf  # lazy: numpy only at import time
    except ImportError:  # pragma: no cover - scipy is installed in the test venv
        erf = np.vectorize(math.erf, otypes=[np.float64])
    return erf(x)


def _gelu_exact(x):
    """GELU, exact erf form: 0.5 * x * (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _layer_norm(x, weight, bias, eps=LN_EPS):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased variance, like torch
    return (x - mean) / np.sqrt(var + eps) * _f64(weight) + _f64(bias)


CLIP_LN_EPS = 1e-5


def _quick_gelu(x):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x / (1.0 + np.exp(-1.702 * x))


def _linear(x, weight, bias):
    """torch.nn.Linear: weight is (out_features, in_features)."""
    return x @ _f64(weight).T + _f64(bias)


def _softmax_last(x):
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def _patch_embed(frames, weight, bias):
    """Conv2d(3, width, kernel=p, stride=p, VALID) on channels-last frames.

    frames: (N, H, W, 3) RGB; weight: (width, 3, p, p) OIHW.
    Returns (N, gh*gw, width) with patches in row-major (gh, gw) order.
    """
    w = _f64(weight)
    width, cin, p, p2 = w.shape
    assert cin == 3 and p == p2, w.shape
    n, h, wd, c = frames.shape
    assert c == 3, frames.shape
    gh, gw = h // p, wd // p
    x = frames[:, : gh * p, : gw * p, :]                       # VALID: drop the remainder
    x = x.reshape(n, gh, p, gw, p, c)                           # (n, gh, i, gw, j, c)
    # out[n, gy, gx, o] = sum_{c,i,j} W[o, c, i, j] * x[n, gy*p+i, gx*p+j, c] + b[o]
    out = np.einsum("nyixjc,ocij->nyxo", x, w) + _f64(bias)
    return out.reshape(n, gh * gw, width)


# --------------------------------------------------------------------------------------
# TokenShift (docs/model.md): CLS-only shift of the residual stream
# --------------------------------------------------------------------------------------

def _token_shift(x, t, shift_div, boundary):
    """x: (B*T, N, C). CLS channels [0, fold) <- frame t+1, [fold, 2 fold) <- frame t-1."""
    bt, n, c = x.shape
    b = bt // t
    x = x.reshape(b, t, n, c)
    fold = c // shift_div
    out = np.zeros_like(x)
    if boundary == "zero":
        out[:, :-1, 0, :fold] = x[:, 1:, 0, :fold]                       # from t+1
        out[:, 1:, 0, fold:2 * fold] = x[:, :-1, 0, fold:2 * fold]       # from t-1
    elif boundary == "circular":
        from_next = np.roll(x, -1, axis=1)   # from_next[:, t] = x[:, t+1 mod T]
        from_prev = np.roll(x, 1, axis=1)    # from_prev[:, t] = x[:, t-1 mod T]
        out[:, :, 0, :fold] = from_next[:, :, 0, :fold]
        out[:, :, 0, fold:2 * fold] = from_prev[:, :, 0, fold:2 * fold]
    else:
        raise ValueError(boundary)
    out[:, :, 1:, :2 * fold] = x[:, :, 1:, :2 * fold]   # patch tokens never shifted
    out[:, :, :, 2 * fold:] = x[:, :, :, 2 * fold:]     # remaining channels unchanged
    return out.reshape(bt, n, c)


# --------------------------------------------------------------------------------------
# MSCA shifts (docs/model.md) on projected tensors of shape (B*T, heads, N, dh)
# --------------------------------------------------------------------------------------

def _msca_shift_heads(z, t, shift_div, boundary):
    """Head axis, as the official MSCA-KV code: heads [0, fold) <- t+1,
    heads [H-fold, H) <- t-1, heads in between unchanged; all tokens (CLS included)."""
    bt, h, n, d = z.shape
    b = bt // t
    z = z.reshape(b, t, h, n, d)
    fold = h // shift_div
    out = np.zeros_like(z)
    if boundary == "zero":
        out[:, :-1, 0:fold] = z[:, 1:, 0:fold]                 # from t+1
        out[:, 1:, h - fold:] = z[:, :-1, h - fold:]           # from t-1 (empty if fold 0)
    elif boundary == "circular":
        from_next = np.roll(z, -1, axis=1)
        from_prev = np.roll(z, 1, axis=1)
        out[:, :, 0:fold] = from_next[:, :, 0:fold]
        out[:, :, h - fold:] = from_prev[:, :, h - fold:]
    else:
        raise ValueError(boundary)
    out[:, :, fold:h - fold] = z[:, :, fold:h - fold]   # fold 0: h - fold == h, all heads
    return out.reshape(bt, h, n, d)


def _msca_shift_patches(z, t, shift_div, boundary):
    """Patch axis (our documented interpretation): all heads; patch p (token 1+p) with
    p % shift_div == 0 <- t+1, p % shift_div == 1 <- t-1; CLS (token 0) never shifted."""
    bt, h, n, d = z.shape
    b = bt // t
    z = z.reshape(b, t, h, n, d)
    n_patches = n - 1
    fwd = np.array([1 + p for p in range(n_patches) if p % shift_div == 0], dtype=np.int64)
    bwd = np.array([1 + p for p in range(n_patches) if p % shift_div == 1], dtype=np.int64)
    out = z.copy()
    out[:, :, :, fwd, :] = 0.0
    out[:, :, :, bwd, :] = 0.0
    if boundary == "zero":
        out[:, :-1, :, fwd, :] = z[:, 1:, :, fwd, :]            # from t+1
        out[:, 1:, :, bwd, :] = z[:, :-1, :, bwd, :]            # from t-1
    elif boundary == "circular":
        from_next = np.roll(z, -1, axis=1)
        from_prev = np.roll(z, 1, axis=1)
        out[:, :, :, fwd, :] = from_next[:, :, :, fwd, :]
        out[:, :, :, bwd, :] = from_prev[:, :, :, bwd, :]
    else:
        raise ValueError(boundary)
    return out.reshape(bt, h, n, d)


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------

def _attention(sd, prefix, y, *, num_heads, t, model, shift_div, msca_targets, msca_axis,
               boundary, cap):
    """Multi-head (self / temporal cross) attention on y: (B*T, N, C)."""
    bt, n, c = y.shape
    dh = c // num_heads

    def heads(a):  # transpose_for_scores: (bt, n, c) -> (bt, heads, n, dh)
        return a.reshape(bt, n, num_heads, dh).transpose(0, 2, 1, 3)

    q = heads(_linear(y, sd[prefix + "query.weight"], sd[prefix + "query.bias"]))
    k = heads(_linear(y, sd[prefix + "key.weight"], sd[prefix + "key.bias"]))
    v = heads(_linear(y, sd[prefix + "value.weight"], sd[prefix + "value.bias"]))
    if cap is not None:
        cap["q"], cap["k"], cap["v"] = q, k, v

    if model == "msca":
        shift = _msca_shift_heads if msca_axis == "head" else _msca_shift_patches
        if "q" in msca_targets:
            q = shift(q, t, shift_div, boundary)
        if "k" in msca_targets:
            k = shift(k, t, shift_div, boundary)
        if "v" in msca_targets:
            v = shift(v, t, shift_div, boundary)
    if cap is not None:
        cap["q_used"], cap["k_used"], cap["v_used"] = q, k, v

    ctx = np.zeros((bt, num_heads, n, dh))
    for hh in range(num_heads):
        scores = q[:, hh] @ k[:, hh].transpose(0, 2, 1) / math.sqrt(dh)   # (bt, n, n)
        probs = _softmax_last(scores)
        ctx[:, hh] = probs @ v[:, hh]
    if cap is not None:
        cap["head_out"] = ctx
    merged = ctx.transpose(0, 2, 1, 3).reshape(bt, n, c)   # channel = h*dh + j
    return _linear(merged, sd[prefix + "out.weight"], sd[prefix + "out.bias"])


def _validate(model, msca_targets, msca_axis, boundary, shift_div):
    if model not in ("vit", "tokenshift", "msca"):
        raise ValueError(f"model must be vit|tokenshift|msca, got {model!r}")
    if boundary not in ("zero", "circular"):
        raise ValueError(f"boundary must be zero|circular, got {boundary!r}")
    if model == "msca":
        if msca_axis not in ("head", "patch"):
            raise ValueError(f"msca_axis must be head|patch, got {msca_axis!r}")
        if (not msca_targets or set(msca_targets) - set("qkv")
                or len(set(msca_targets)) != len(msca_targets)):
            raise ValueError(f"msca_targets must be a non-empty combination of q,k,v: "
                             f"{msca_targets!r}")
    if model != "vit" and (not isinstance(shift_div, (int, np.integer)) or shift_div < 1):
        raise ValueError(f"shift_div must be a positive int, got {shift_div!r}")


def forward(sd, video, *, num_heads, model="vit", shift_div=4, msca_targets="kv",
            msca_axis="head", boundary="zero", return_frame_logits=False, capture=None,
            clip=False):
    """Reference forward pass (docs/model.md), float64.

    clip=True is CLIP's vision tower on the same layout: no patch bias (the key may be absent),
    a LayerNorm 'transformer.embeddings.ln_pre.{weight,bias}' after the position embedding,
    LayerNorm eps 1e-5, QuickGELU, and 'proj' (width, output dim) on the final CLS if present.

    sd: reference-layout state dict (see ``random_state_dict``).
    video: (B, T, H, W, 3), RGB, values in [-1, 1].
    model: 'vit' | 'tokenshift' | 'msca'.
    shift_div: TokenShift: fold = C // shift_div; MSCA head axis: fold = num_heads // shift_div;
        MSCA patch axis: patch p from t+1 if p % shift_div == 0, from t-1 if == 1.
    msca_targets: non-empty combination of 'q', 'k', 'v' (e.g. 'kv', 'qkv').
    msca_axis: 'head' | 'patch'. boundary: 'zero' | 'circular'.
    return_frame_logits: if True return ``(logits (B, K), frame_logits (B, T, K))``.
    capture: optional dict (test introspection); filled with
        capture['layers'][i] = {'block_in', 'attn_in', 'q', 'k', 'v', 'q_used', 'k_used',
        'v_used', 'head_out'} where token tensors are (B, T, N, C) and per-head tensors are
        (B, T, heads, N, dh) (q/k/v before the MSCA shift, *_used after it, head_out = per-head
        attention output before the out projection), plus capture['frame_logits'] (B, T, K).
    Returns logits (B, K): per-frame logits averaged over T.
    """
    _validate(model, msca_targets, msca_axis, boundary, shift_div)
    video = _f64(video)
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"video must be (B, T, H, W, 3), got {video.shape}")
    b, t, h, w, _ = video.shape
    frames = video.reshape(b * t, h, w, 3)        # batch-major: frame index = b*T + t

    e = "transformer.embeddings."
    eps = CLIP_LN_EPS if clip else LN_EPS
    width = sd[e + "patch_embeddings.weight"].shape[0]
    patch_bias = sd.get(e + "patch_embeddings.bias", np.zeros(width)) if clip else sd[e + "patch_embeddings.bias"]
    x = _patch_embed(frames, sd[e + "patch_embeddings.weight"], patch_bias)
    bt, n_patches, c = x.shape
    if c % num_heads != 0:
        raise ValueError(f"width {c} not divisible by num_heads {num_heads}")
    cls = np.broadcast_to(_f64(sd[e + "cls_token"]).reshape(1, 1, c), (bt, 1, c))
    x = np.concatenate([cls, x], axis=1)
    pos = _f64(sd[e + "position_embeddings"])
    if pos.shape != (1, 1 + n_patches, c):
        raise ValueError(f"position embedding {pos.shape} does not fit {1 + n_patches} tokens")
    x = x + pos
    if clip:
        x = _layer_norm(x, sd[e + "ln_pre.weight"], sd[e + "ln_pre.bias"], eps)

    depth = 0
    while f"transformer.encoder.layer.{depth}.attention_norm.weight" in sd:
        depth += 1
    if depth == 0:
        raise KeyError("no transformer.encoder.layer.0.* keys in state dict")

    def per_frame(a):  # (B*T, ...) -> (B, T, ...)
        return a.reshape((b, t) + a.shape[1:])

    if capture is not None:
        capture["layers"] = []
    for i in range(depth):
        p = f"transformer.encoder.layer.{i}."
        cap = {} if capture is not None else None
        if cap is not None:
            cap["block_in"] = per_frame(x)

        if model == "tokenshift":
            x = _token_shift(x, t, shift_div, boundary)
        y = _layer_norm(x, sd[p + "attention_norm.weight"], sd[p + "attention_norm.bias"], eps)
        if cap is not None:
            cap["attn_in"] = per_frame(y)
        x = x + _attention(sd, p + "attn.", y, num_heads=num_heads, t=t, model=model,
                           shift_div=shift_div, msca_targets=msca_targets,
                           msca_axis=msca_axis, boundary=boundary, cap=cap)

        if model == "tokenshift":
            x = _token_shift(x, t, shift_div, boundary)
        y = _layer_norm(x, sd[p + "ffn_norm.weight"], sd[p + "ffn_norm.bias"], eps)
        y = _linear(y, sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"])
        y = _quick_gelu(y) if clip else _gelu_exact(y)
        y = _linear(y, sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"])
        x = x + y

        if cap is not None:
            for key in ("q", "k", "v", "q_used", "k_used", "v_used", "head_out"):
                cap[key] = per_frame(cap[key])
            capture["layers"].append(cap)

    x = _layer_norm(x, sd["transformer.encoder.encoder_norm.weight"],
                    sd["transformer.encoder.encoder_norm.bias"], eps)
    features = x[:, 0]
    if clip and "proj" in sd:
        features = features @ _f64(sd["proj"])
    frame_logits = _linear(features, sd["head.weight"], sd["head.bias"])   # (B*T, K)
    frame_logits = frame_logits.reshape(b, t, -1)
    logits = frame_logits.mean(axis=1)
    if capture is not None:
        capture["frame_logits"] = frame_logits
    if return_frame_logits:
        return logits, frame_logits
    return logits


# --------------------------------------------------------------------------------------
# Google checkpoint layouts (docs/weights.md)
# --------------------------------------------------------------------------------------

def _infer_dims(sd):
    width = sd["transformer.embeddings.cls_token"].shape[-1]
    depth = 0
    while f"transformer.encoder.layer.{depth}.attention_norm.weight" in sd:
        depth += 1
    mlp_dim = sd["transformer.encoder.layer.0.ffn.fc1.weight"].shape[0]
    return width, depth, mlp_dim


def to_google_npz(sd, *, num_heads, style):
    """Reference-layout state dict -> Google ViT checkpoint dict (flat '/'-joined keys).

    style: 'i21k' (pre-Linen names, pre_logits and an all-zero fake 21k head with
    I21K_FAKE_CLASSES classes), 'augreg' (pre-Linen names, no pre_logits, a non-zero head
    with AUGREG_FAKE_CLASSES classes), 'big_vision' ('params/' prefix, Linen counters,
    top-level pos_embedding, non-zero head with BIG_VISION_FAKE_CLASSES classes),
    'opt_target' (the i21k layout with an 'opt/target/' prefix).
    The head in the result is never sd's own head (loaders must drop it).
    """
    if style not in GOOGLE_STYLES:
        raise ValueError(f"style must be one of {GOOGLE_STYLES}, got {style!r}")
    width, depth, mlp_dim = _infer_dims(sd)
    if width % num_heads != 0:
        raise ValueError(f"width {width} not divisible by num_heads {num_heads}")
    dh = width // num_heads
    rng = np.random.default_rng(12345)  # fixed: the fake heads / pre_logits are deterministic

    def f32(a):
        return np.ascontiguousarray(np.asarray(a, dtype=np.float32))

    linen = style == "big_vision"
    attn_name = "MultiHeadDotProductAttention_0" if linen else "MultiHeadDotProductAttention_1"
    ln_mlp_name = "LayerNorm_1" if linen else "LayerNorm_2"
    mlp_name = "MlpBlock_0" if linen else "MlpBlock_3"

    g = {}
    e = "transformer.embeddings."
    # OIHW -> HWIO
    g["embedding/kernel"] = f32(np.asarray(sd[e + "patch_embeddings.weight"]).transpose(2, 3, 1, 0))
    g["embedding/bias"] = f32(sd[e + "patch_embeddings.bias"])
    g["cls"] = f32(sd[e + "cls_token"])
    pos_key = "pos_embedding" if linen else "Transformer/posembed_input/pos_embedding"
    g[pos_key] = f32(sd[e + "position_embeddings"])
    for i in range(depth):
        p = f"transformer.encoder.layer.{i}."
        r = f"Transformer/encoderblock_{i}/"
        g[r + "LayerNorm_0/scale"] = f32(sd[p + "attention_norm.weight"])
        g[r + "LayerNorm_0/bias"] = f32(sd[p + "attention_norm.bias"])
        for name in ("query", "key", "value"):
            wt = np.asarray(sd[p + f"attn.{name}.weight"])        # (out = heads*dh, in)
            g[r + f"{attn_name}/{name}/kernel"] = f32(wt.T.reshape(width, num_heads, dh))
            g[r + f"{attn_name}/{name}/bias"] = f32(
                np.asarray(sd[p + f"attn.{name}.bias"]).reshape(num_heads, dh))
        wo = np.asarray(sd[p + "attn.out.weight"])                # (out = width, in = heads*dh)
        g[r + f"{attn_name}/out/kernel"] = f32(wo.T.reshape(num_heads, dh, width))
        g[r + f"{attn_name}/out/bias"] = f32(sd[p + "attn.out.bias"])
        g[r + f"{ln_mlp_name}/scale"] = f32(sd[p + "ffn_norm.weight"])
        g[r + f"{ln_mlp_name}/bias"] = f32(sd[p + "ffn_norm.bias"])
        g[r + f"{mlp_name}/Dense_0/kernel"] = f32(np.asarray(sd[p + "ffn.fc1.weight"]).T)
        g[r + f"{mlp_name}/Dense_0/bias"] = f32(sd[p + "ffn.fc1.bias"])
        g[r + f"{mlp_name}/Dense_1/kernel"] = f32(np.asarray(sd[p + "ffn.fc2.weight"]).T)
        g[r + f"{mlp_name}/Dense_1/bias"] = f32(sd[p + "ffn.fc2.bias"])
    g["Transformer/encoder_norm/scale"] = f32(sd["transformer.encoder.encoder_norm.weight"])
    g["Transformer/encoder_norm/bias"] = f32(sd["transformer.encoder.encoder_norm.bias"])

    if style in ("i21k", "opt_target"):
        g["pre_logits/kernel"] = f32(rng.standard_normal((width, width)) / math.sqrt(width))
        g["pre_logits/bias"] = f32(0.1 * rng.standard_normal((width,)))
        g["head/kernel"] = np.zeros((width, I21K_FAKE_CLASSES), np.float32)
        g["head/bias"] = np.zeros((I21K_FAKE_CLASSES,), np.float32)
    elif style == "augreg":
        g["head/kernel"] = f32(rng.standard_normal((width, AUGREG_FAKE_CLASSES)) / math.sqrt(width))
        g["head/bias"] = f32(0.1 * rng.standard_normal((AUGREG_FAKE_CLASSES,)))
    else:  # big_vision
        g["head/kernel"] = f32(rng.standard_normal((width, BIG_VISION_FAKE_CLASSES)) / math.sqrt(width))
        g["head/bias"] = f32(0.1 * rng.standard_normal((BIG_VISION_FAKE_CLASSES,)))

    if style == "big_vision":
        g = {"params/" + k: v for k, v in g.items()}
    elif style == "opt_target":
        g = {"opt/target/" + k: v for k, v in g.items()}
    return g


# --------------------------------------------------------------------------------------
# transformers ViTModel -> reference layout
# --------------------------------------------------------------------------------------

# (regex on the HF key, reference key template). Both transformers 4.x names
# (encoder.layer.{i}.attention.attention.query ...) and transformers >= 5 names
# (layers.{i}.attention.q_proj ...) are accepted.
_HF_RULES = [
    (r"embeddings\.cls_token", "transformer.embeddings.cls_token"),
    (r"embeddings\.position_embeddings", "transformer.embeddings.position_embeddings"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)",
     "transformer.embeddings.patch_embeddings.{0}"),
    (r"layernorm\.(weight|bias)", "transformer.encoder.encoder_norm.{0}"),
    # transformers 4.x
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)",
     "transformer.encoder.layer.{0}.attn.{1}.{2}"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)",
     "transformer.encoder.layer.{0}.attn.out.{1}"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)",
     "transformer.encoder.layer.{0}.ffn.fc1.{1}"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)",
     "transformer.encoder.layer.{0}.ffn.fc2.{1}"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)",
     "transformer.encoder.layer.{0}.attention_norm.{1}"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)",
     "transformer.encoder.layer.{0}.ffn_norm.{1}"),
    # transformers >= 5
    (r"layers\.(\d+)\.attention\.(q|k|v|o)_proj\.(weight|bias)", None),  # handled below
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", "transformer.encoder.layer.{0}.ffn.{1}.{2}"),
    (r"layers\.(\d+)\.layernorm_before\.(weight|bias)",
     "transformer.encoder.layer.{0}.attention_norm.{1}"),
    (r"layers\.(\d+)\.layernorm_after\.(weight|bias)",
     "transformer.encoder.layer.{0}.ffn_norm.{1}"),
]
_HF5_PROJ = {"q": "query", "k": "key", "v": "value", "o": "out"}


def hf_vit_to_reference(hf_sd):
    """transformers ViTModel(add_pooling_layer=False) state dict (numpy) -> reference layout.

    The result has no head (the caller adds head.weight / head.bias). Raises KeyError on any
    key that is not mapped (pooler, mask_token, prefixed keys, ...), on duplicates and on an
    incomplete result.
    """
    out = {}
    unmapped = []
    for key, value in hf_sd.items():
        target = None
        for pattern, template in _HF_RULES:
            m = re.fullmatch(pattern, key)
            if m is None:
                continue
            if template is None:  # transformers >= 5 attention projections
                i, which, kind = m.groups()
                target = f"transformer.encoder.layer.{i}.attn.{_HF5_PROJ[which]}.{kind}"
            else:
                target = template.format(*m.groups())
            break
        if target is None:
            unmapped.append(key)
            continue
        if target in out:
            raise KeyError(f"two HF keys map to {target!r} (second: {key!r})")
        out[target] = np.array(value, dtype=np.float32, copy=True)
    if unmapped:
        raise KeyError(f"hf_vit_to_reference: unmapped keys {sorted(unmapped)}")

    # Completeness check against the reference layout (without the head).
    depth = 0
    while f"transformer.encoder.layer.{depth}.attention_norm.weight" in out:
        depth += 1
    expected = {
        "transformer.embeddings.position_embeddings", "transformer.embeddings.cls_token",
        "transformer.embeddings.patch_embeddings.weight",
        "transformer.embeddings.patch_embeddings.bias",
        "transformer.encoder.encoder_norm.weight", "transformer.encoder.encoder_norm.bias",
    }
    for i in range(depth):
        expected.update(_block_keys(i))
    if set(out) != expected:
        raise KeyError(f"hf_vit_to_reference: missing {sorted(expected - set(out))}, "
                       f"unexpected {sorted(set(out) - expected)}")
    return out
