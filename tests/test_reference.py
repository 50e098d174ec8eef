"""Self-checks of the NumPy reference (tests/reference.py) used as ground truth."""

import math

import numpy as np
import pytest

from tests import reference

WIDTH, DEPTH, HEADS, MLP, PATCH, IMG = 64, 2, 4, 96, 8, 32
GRID = (IMG // PATCH, IMG // PATCH)
CLASSES = 5
DH = WIDTH // HEADS
N_TOKENS = 1 + GRID[0] * GRID[1]


def _sd(seed=0):
    return reference.random_state_dict(seed, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                                       mlp_dim=MLP, patch_size=PATCH, grid=GRID,
                                       num_classes=CLASSES)


def _video(seed=1, b=2, t=4):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, size=(b, t, IMG, IMG, 3)).astype(np.float32)


# ------------------------------------------------------------------ basic sanity

def test_random_state_dict_layout_and_magnitudes():
    sd = _sd()
    expected = {
        "transformer.embeddings.position_embeddings": (1, N_TOKENS, WIDTH),
        "transformer.embeddings.cls_token": (1, 1, WIDTH),
        "transformer.embeddings.patch_embeddings.weight": (WIDTH, 3, PATCH, PATCH),
        "transformer.embeddings.patch_embeddings.bias": (WIDTH,),
        "transformer.encoder.encoder_norm.weight": (WIDTH,),
        "transformer.encoder.encoder_norm.bias": (WIDTH,),
        "head.weight": (CLASSES, WIDTH),
        "head.bias": (CLASSES,),
    }
    for i in range(DEPTH):
        p = f"transformer.encoder.layer.{i}."
        for n in ("attention_norm", "ffn_norm"):
            expected[p + n + ".weight"] = (WIDTH,)
            expected[p + n + ".bias"] = (WIDTH,)
        for n in ("query", "key", "value", "out"):
            expected[p + f"attn.{n}.weight"] = (WIDTH, WIDTH)
            expected[p + f"attn.{n}.bias"] = (WIDTH,)
        expected[p + "ffn.fc1.weight"] = (MLP, WIDTH)
        expected[p + "ffn.fc1.bias"] = (MLP,)
        expected[p + "ffn.fc2.weight"] = (WIDTH, MLP)
        expected[p + "ffn.fc2.bias"] = (WIDTH,)
    assert {k: v.shape for k, v in sd.items()} == expected
    for k, v in sd.items():
        assert v.dtype == np.float32
        assert not np.any(v == 0.0), k
        assert not np.any(v == 1.0), k
    # Deterministic in the seed, different across seeds.
    sd2 = _sd()
    assert all(np.array_equal(sd[k], sd2[k]) for k in sd)
    assert not np.array_equal(sd["head.weight"], _sd(seed=1)["head.weight"])
    logits = reference.forward(sd, _video(), num_heads=HEADS)
    assert logits.shape == (2, CLASSES)
    assert 0.05 < np.abs(logits).max() < 20.0


# ------------------------------------------------------------------ ViT vs transformers

def _randomise_torch_state_dict(sd_torch, rng):
    import torch

    new = {}
    for name, tensor in sd_torch.items():
        shape = tuple(tensor.shape)
        if "layernorm" in name and name.endswith("weight"):
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            arr = 0.1 * rng.standard_normal(shape)
        elif name.endswith(("cls_token", "position_embeddings")):
            arr = 0.5 * rng.standard_normal(shape)
        elif name.endswith("weight"):
            fan_in = int(np.prod(shape[1:]))
            arr = rng.standard_normal(shape) / math.sqrt(fan_in)
        else:
            raise AssertionError(f"unexpected HF parameter {name}")
        new[name] = torch.from_numpy(arr.astype(np.float32))
    return new


def test_vit_matches_transformers_vitmodel():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=MLP, image_size=IMG, patch_size=PATCH, layer_norm_eps=1e-6,
        hidden_act="gelu", qkv_bias=True, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    hf = transformers.ViTModel(config, add_pooling_layer=False).eval()
    rng = np.random.default_rng(7)
    new_sd = _randomise_torch_state_dict(hf.state_dict(), rng)
    hf.load_state_dict(new_sd, strict=True)

    hf_np = {k: v.detach().cpu().numpy() for k, v in hf.state_dict().items()}
    sd = reference.hf_vit_to_reference(hf_np)
    sd["head.weight"] = (rng.standard_normal((CLASSES, WIDTH)) / 8.0).astype(np.float32)
    sd["head.bias"] = (0.1 * rng.standard_normal((CLASSES,))).astype(np.float32)

    b, t = 2, 3
    video = _video(seed=3, b=b, t=t)
    ours = reference.forward(sd, video, num_heads=HEADS, model="vit")

    with torch.no_grad():
        pix = torch.from_numpy(video.reshape(b * t, IMG, IMG, 3)).permute(0, 3, 1, 2)
        hidden = hf(pixel_values=pix.contiguous()).last_hidden_state[:, 0]     # (B*T, C)
        frame_logits = hidden @ torch.from_numpy(sd["head.weight"]).T + torch.from_numpy(sd["head.bias"])
        theirs = frame_logits.reshape(b, t, CLASSES).mean(dim=1).numpy()
    assert np.abs(ours).max() > 0.1   # not trivially small
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_hf_mapping_fails_loudly():
    sd = {"embeddings.cls_token": np.zeros((1, 1, 4)), "pooler.dense.weight": np.zeros((4, 4))}
    with pytest.raises(KeyError, match="pooler"):
        reference.hf_vit_to_reference(sd)
    with pytest.raises(KeyError, match="missing"):
        reference.hf_vit_to_reference({"embeddings.cls_token": np.zeros((1, 1, 4))})


# ------------------------------------------------------------------ fold 0 == ViT

@pytest.mark.parametrize("boundary", ["zero", "circular"])
def test_fold_zero_equals_vit(boundary):
    sd, video = _sd(), _video()
    vit = reference.forward(sd, video, num_heads=HEADS, model="vit")
    ts = reference.forward(sd, video, num_heads=HEADS, model="tokenshift",
                           shift_div=WIDTH + 1, boundary=boundary)
    np.testing.assert_array_equal(ts, vit)
    for targets in ("q", "k", "v", "qk", "qv", "kv", "qkv"):
        ms = reference.forward(sd, video, num_heads=HEADS, model="msca", shift_div=HEADS + 1,
                               msca_targets=targets, msca_axis="head", boundary=boundary)
        np.testing.assert_array_equal(ms, vit)


def test_shifted_models_differ_from_vit_and_break_time_reversal():
    sd, video = _sd(), _video()
    rev = video[:, ::-1]
    vit = reference.forward(sd, video, num_heads=HEADS, model="vit")
    np.testing.assert_allclose(reference.forward(sd, rev, num_heads=HEADS, model="vit"), vit,
                               atol=1e-12)
    variants = [dict(model="tokenshift", shift_div=4)]
    variants += [dict(model="msca", shift_div=4, msca_targets=tg, msca_axis=ax)
                 for tg in ("q", "k", "v", "qk", "qv", "kv", "qkv") for ax in ("head", "patch")]
    for kw in variants:
        for boundary in ("zero", "circular"):
            out = reference.forward(sd, video, num_heads=HEADS, boundary=boundary, **kw)
            out_rev = reference.forward(sd, rev, num_heads=HEADS, boundary=boundary, **kw)
            assert np.abs(out - vit).max() > 1e-4, (kw, boundary)
            assert np.abs(out - out_rev).max() > 1e-6, (kw, boundary)


def test_tokenshift_channels_and_tokens():
    """Independent check of the CLS shift on the captured block input of layer 0."""
    sd, video = _sd(), _video()
    cap_vit, cap_ts = {}, {}
    reference.forward(sd, video, num_heads=HEADS, model="vit", capture=cap_vit)
    reference.forward(sd, video, num_heads=HEADS, model="tokenshift", shift_div=4,
                      capture=cap_ts)
    x = cap_ts["layers"][0]["block_in"]            # embeddings, identical for both models
    np.testing.assert_array_equal(x, cap_vit["layers"][0]["block_in"])
    fold = WIDTH // 4
    # Rebuild the LN input of layer 0 by hand from the shifted stream.
    shifted = x.copy()
    t = x.shape[1]
    for ti in range(t):
        nxt = x[:, ti + 1, 0, :fold] if ti + 1 < t else 0.0
        prv = x[:, ti - 1, 0, fold:2 * fold] if ti - 1 >= 0 else 0.0
        shifted[:, ti, 0, :fold] = nxt
        shifted[:, ti, 0, fold:2 * fold] = prv
    p = "transformer.encoder.layer.0.attention_norm."
    w, b = sd[p + "weight"].astype(np.float64), sd[p + "bias"].astype(np.float64)
    mu = shifted.mean(-1, keepdims=True)
    var = shifted.var(-1, keepdims=True)
    ln = (shifted - mu) / np.sqrt(var + 1e-6) * w + b
    np.testing.assert_allclose(cap_ts["layers"][0]["attn_in"], ln, atol=1e-12)


# ------------------------------------------------------------------ MSCA-QKV == head-output shift

def _time_shift_heads(a, fold, boundary):
    """a: (B, T, H, ...). Heads [0, fold) from t+1, [H-fold, H) from t-1 (independent loop)."""
    out = a.copy()
    t, h = a.shape[1], a.shape[2]
    for ti in range(t):
        for hh in range(h):
            if hh < fold:
                src = ti + 1
            elif hh >= h - fold:
                src = ti - 1
            else:
                continue
            if boundary == "circular":
                out[:, ti, hh] = a[:, src % t, hh]
            elif 0 <= src < t:
                out[:, ti, hh] = a[:, src, hh]
            else:
                out[:, ti, hh] = 0.0
    return out


def _plain_self_attention_heads(sd, layer, y):
    """Per-frame self-attention head outputs from LN output y: (B, T, N, C) -> (B, T, H, N, dh)."""
    p = f"transformer.encoder.layer.{layer}.attn."
    outs = []
    for name in ("query", "key", "value"):
        w = sd[p + name + ".weight"].astype(np.float64)
        b = sd[p + name + ".bias"].astype(np.float64)
        z = np.einsum("btnc,oc->btno", y, w) + b
        outs.append(z.reshape(z.shape[:3] + (HEADS, DH)))
    q, k, v = outs                                                     # (B, T, N, H, dh)
    s = np.einsum("btnhd,btmhd->bthnm", q, k) / math.sqrt(DH)
    s = np.exp(s - s.max(-1, keepdims=True))
    s = s / s.sum(-1, keepdims=True)
    return np.einsum("bthnm,btmhd->bthnd", s, v)


def _independent_output_shift_forward(sd, video, shift_div, boundary):
    """Whole network, written independently: ViT where each shifted head's attention OUTPUT
    is taken from frame t+-1 (zero outside the clip for 'zero')."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    bsz, t = video.shape[:2]
    fold = HEADS // shift_div
    x = video.astype(np.float64).reshape(bsz, t, GRID[0], PATCH, GRID[1], PATCH, 3)
    w = sd["transformer.embeddings.patch_embeddings.weight"]
    tok = np.einsum("btyixjc,ocij->btyxo", x, w).reshape(bsz, t, -1, WIDTH)
    tok = tok + sd["transformer.embeddings.patch_embeddings.bias"]
    cls = np.broadcast_to(sd["transformer.embeddings.cls_token"], (bsz, t, 1, WIDTH))
    h = np.concatenate([cls, tok], axis=2) + sd["transformer.embeddings.position_embeddings"][0]

    def ln(a, prefix):
        mu = a.mean(-1, keepdims=True)
        return (a - mu) / np.sqrt(a.var(-1, keepdims=True) + 1e-6) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    from scipy.special import erf
    for i in range(DEPTH):
        p = f"transformer.encoder.layer.{i}."
        heads = _time_shift_heads(_plain_self_attention_heads(sd, i, ln(h, p + "attention_norm")),
                                  fold, boundary)
        merged = np.moveaxis(heads, 2, 3).reshape(bsz, t, N_TOKENS, WIDTH)
        h = h + merged @ sd[p + "attn.out.weight"].T + sd[p + "attn.out.bias"]
        m = ln(h, p + "ffn_norm") @ sd[p + "ffn.fc1.weight"].T + sd[p + "ffn.fc1.bias"]
        m = 0.5 * m * (1 + erf(m / math.sqrt(2)))
        h = h + m @ sd[p + "ffn.fc2.weight"].T + sd[p + "ffn.fc2.bias"]
    h = ln(h, "transformer.encoder.encoder_norm")
    return (h[:, :, 0] @ sd["head.weight"].T + sd["head.bias"]).mean(axis=1)


@pytest.mark.parametrize("boundary", ["zero", "circular"])
@pytest.mark.parametrize("shift_div", [4, 2])
def test_msca_qkv_equals_head_output_shift(boundary, shift_div):
    sd, video = _sd(), _video()
    fold = HEADS // shift_div
    assert fold >= 1
    cap = {}
    ours = reference.forward(sd, video, num_heads=HEADS, model="msca", shift_div=shift_div,
                             msca_targets="qkv", msca_axis="head", boundary=boundary,
                             capture=cap)
    # Layer by layer: head outputs == time-shifted plain self-attention head outputs.
    for i, layer in enumerate(cap["layers"]):
        plain = _plain_self_attention_heads(sd, i, layer["attn_in"])
        np.testing.assert_allclose(layer["head_out"], _time_shift_heads(plain, fold, boundary),
                                   atol=1e-12)
    # End to end against an independently written network.
    np.testing.assert_allclose(ours, _independent_output_shift_forward(sd, video, shift_div, boundary),
                               atol=1e-10)


def test_msca_kv_head_shift_uses_neighbour_frames():
    sd, video = _sd(), _video()
    cap = {}
    reference.forward(sd, video, num_heads=HEADS, model="msca", shift_div=4, msca_targets="kv",
                      msca_axis="head", boundary="zero", capture=cap)
    for layer in cap["layers"]:
        np.testing.assert_array_equal(layer["q_used"], layer["q"])   # Q never shifted
        for name in ("k", "v"):
            raw, used = layer[name], layer[name + "_used"]
            np.testing.assert_array_equal(used[:, :-1, 0], raw[:, 1:, 0])      # head 0 <- t+1
            np.testing.assert_array_equal(used[:, 1:, -1], raw[:, :-1, -1])    # head H-1 <- t-1
            np.testing.assert_array_equal(used[:, :, 1:-1], raw[:, :, 1:-1])   # others as is
            assert np.all(used[:, -1, 0] == 0.0) and np.all(used[:, 0, -1] == 0.0)


@pytest.mark.parametrize("targets", ["kv", "qkv", "v"])
def test_zero_boundary_shifted_head_outputs_exactly_zero(targets):
    sd, video = _sd(), _video()
    t = video.shape[1]
    cap = {}
    reference.forward(sd, video, num_heads=HEADS, model="msca", shift_div=4,
                      msca_targets=targets, msca_axis="head", boundary="zero", capture=cap)
    for layer in cap["layers"]:
        ho = layer["head_out"]                                   # (B, T, H, N, dh)
        assert np.all(ho[:, t - 1, 0] == 0.0)                    # head 0 at last frame
        assert np.all(ho[:, 0, HEADS - 1] == 0.0)                # head H-1 at first frame
        assert np.all(np.abs(ho[:, : t - 1, 0]) > 0.0)           # elsewhere non-zero
        assert np.all(np.abs(ho[:, 1:, HEADS - 1]) > 0.0)
        assert np.all(np.abs(ho[:, :, 1:HEADS - 1]) > 0.0)
    cap_c = {}
    reference.forward(sd, video, num_heads=HEADS, model="msca", shift_div=4,
                      msca_targets=targets, msca_axis="head", boundary="circular", capture=cap_c)
    for layer in cap_c["layers"]:
        assert np.all(np.abs(layer["head_out"]) > 0.0)


def test_msca_patch_axis_shift_pattern():
    sd, video = _sd(), _video()
    shift_div = 4
    t = video.shape[1]
    for boundary in ("zero", "circular"):
        cap = {}
        reference.forward(sd, video, num_heads=HEADS, model="msca", shift_div=shift_div,
                          msca_targets="kv", msca_axis="patch", boundary=boundary, capture=cap)
        for layer in cap["layers"]:
            np.testing.assert_array_equal(layer["q_used"], layer["q"])
            for name in ("k", "v"):
                raw, used = layer[name], layer[name + "_used"]     # (B, T, H, N, dh)
                np.testing.assert_array_equal(used[:, :, :, 0], raw[:, :, :, 0])   # CLS
                for ti in range(t):
                    for patch in range(N_TOKENS - 1):
                        tok = 1 + patch
                        r = patch % shift_div
                        src = ti + 1 if r == 0 else ti - 1 if r == 1 else ti
                        if boundary == "circular":
                            src %= t
                        got = used[:, ti, :, tok]
                        if 0 <= src < t:
                            np.testing.assert_array_equal(got, raw[:, src, :, tok])
                        else:
                            assert np.all(got == 0.0)


def test_invalid_arguments():
    sd, video = _sd(), _video()
    with pytest.raises(ValueError):
        reference.forward(sd, video, num_heads=HEADS, model="msca", msca_targets="")
    with pytest.raises(ValueError):
        reference.forward(sd, video, num_heads=HEADS, model="msca", msca_targets="kx")
    with pytest.raises(ValueError):
        reference.forward(sd, video, num_heads=HEADS, model="msca", boundary="reflect")
    with pytest.raises(ValueError):
        reference.forward(sd, video, num_heads=HEADS, model="timesformer")


def test_return_frame_logits():
    sd, video = _sd(), _video()
    logits, frame_logits = reference.forward(sd, video, num_heads=HEADS, model="msca",
                                             return_frame_logits=True)
    assert frame_logits.shape == (2, 4, CLASSES)
    np.testing.assert_allclose(logits, frame_logits.mean(axis=1), atol=0)
    np.testing.assert_array_equal(logits, reference.forward(sd, video, num_heads=HEADS,
                                                            model="msca"))


# ------------------------------------------------------------------ Google layouts

def _expected_google(style):
    linen = style == "big_vision"
    attn = "MultiHeadDotProductAttention_0" if linen else "MultiHeadDotProductAttention_1"
    ln2 = "LayerNorm_1" if linen else "LayerNorm_2"
    mlp = "MlpBlock_0" if linen else "MlpBlock_3"
    e = {
        "embedding/kernel": (PATCH, PATCH, 3, WIDTH),
        "embedding/bias": (WIDTH,),
        "cls": (1, 1, WIDTH),
        ("pos_embedding" if linen else "Transformer/posembed_input/pos_embedding"):
            (1, N_TOKENS, WIDTH),
        "Transformer/encoder_norm/scale": (WIDTH,),
        "Transformer/encoder_norm/bias": (WIDTH,),
    }
    for i in range(DEPTH):
        r = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", ln2):
            e[r + ln + "/scale"] = (WIDTH,)
            e[r + ln + "/bias"] = (WIDTH,)
        for n in ("query", "key", "value"):
            e[r + f"{attn}/{n}/kernel"] = (WIDTH, HEADS, DH)
            e[r + f"{attn}/{n}/bias"] = (HEADS, DH)
        e[r + f"{attn}/out/kernel"] = (HEADS, DH, WIDTH)
        e[r + f"{attn}/out/bias"] = (WIDTH,)
        e[r + f"{mlp}/Dense_0/kernel"] = (WIDTH, MLP)
        e[r + f"{mlp}/Dense_0/bias"] = (MLP,)
        e[r + f"{mlp}/Dense_1/kernel"] = (MLP, WIDTH)
        e[r + f"{mlp}/Dense_1/bias"] = (WIDTH,)
    if style in ("i21k", "opt_target"):
        e["pre_logits/kernel"] = (WIDTH, WIDTH)
        e["pre_logits/bias"] = (WIDTH,)
        e["head/kernel"] = (WIDTH, reference.I21K_FAKE_CLASSES)
        e["head/bias"] = (reference.I21K_FAKE_CLASSES,)
    elif style == "augreg":
        e["head/kernel"] = (WIDTH, reference.AUGREG_FAKE_CLASSES)
        e["head/bias"] = (reference.AUGREG_FAKE_CLASSES,)
    else:
        e["head/kernel"] = (WIDTH, reference.BIG_VISION_FAKE_CLASSES)
        e["head/bias"] = (reference.BIG_VISION_FAKE_CLASSES,)
    prefix = {"big_vision": "params/", "opt_target": "opt/target/"}.get(style, "")
    return {prefix + k: v for k, v in e.items()}, prefix


def _google_to_reference(g, style, prefix):
    """Independent inverse (as the authors' load_from does it) for a round-trip check."""
    linen = style == "big_vision"
    attn = "MultiHeadDotProductAttention_0" if linen else "MultiHeadDotProductAttention_1"
    ln2 = "LayerNorm_1" if linen else "LayerNorm_2"
    mlp = "MlpBlock_0" if linen else "MlpBlock_3"
    G = {k[len(prefix):]: v for k, v in g.items()}
    sd = {
        "transformer.embeddings.patch_embeddings.weight": G["embedding/kernel"].transpose(3, 2, 0, 1),
        "transformer.embeddings.patch_embeddings.bias": G["embedding/bias"],
        "transformer.embeddings.cls_token": G["cls"],
        "transformer.embeddings.position_embeddings":
            G["pos_embedding" if linen else "Transformer/posembed_input/pos_embedding"],
        "transformer.encoder.encoder_norm.weight": G["Transformer/encoder_norm/scale"],
        "transformer.encoder.encoder_norm.bias": G["Transformer/encoder_norm/bias"],
    }
    for i in range(DEPTH):
        r, p = f"Transformer/encoderblock_{i}/", f"transformer.encoder.layer.{i}."
        sd[p + "attention_norm.weight"] = G[r + "LayerNorm_0/scale"]
        sd[p + "attention_norm.bias"] = G[r + "LayerNorm_0/bias"]
        sd[p + "ffn_norm.weight"] = G[r + ln2 + "/scale"]
        sd[p + "ffn_norm.bias"] = G[r + ln2 + "/bias"]
        for n in ("query", "key", "value", "out"):
            sd[p + f"attn.{n}.weight"] = G[r + f"{attn}/{n}/kernel"].reshape(WIDTH, WIDTH).T
            sd[p + f"attn.{n}.bias"] = G[r + f"{attn}/{n}/bias"].reshape(-1)
        sd[p + "ffn.fc1.weight"] = G[r + f"{mlp}/Dense_0/kernel"].T
        sd[p + "ffn.fc1.bias"] = G[r + f"{mlp}/Dense_0/bias"]
        sd[p + "ffn.fc2.weight"] = G[r + f"{mlp}/Dense_1/kernel"].T
        sd[p + "ffn.fc2.bias"] = G[r + f"{mlp}/Dense_1/bias"]
    return sd


@pytest.mark.parametrize("style", ["i21k", "augreg", "big_vision", "opt_target"])
def test_to_google_npz_layout(style):
    sd = _sd()
    g = reference.to_google_npz(sd, num_heads=HEADS, style=style)
    expected, prefix = _expected_google(style)
    assert set(g) == set(expected)
    for k, shape in expected.items():
        assert g[k].shape == shape, k
        assert g[k].dtype == np.float32, k
    head_k = g[prefix + "head/kernel"]
    assert head_k.shape[1] != CLASSES          # never the model's own head
    if style in ("i21k", "opt_target"):
        assert np.all(head_k == 0) and np.all(g[prefix + "head/bias"] == 0)
        assert np.any(g[prefix + "pre_logits/kernel"] != 0)
    else:
        assert np.any(head_k != 0)
    back = _google_to_reference(g, style, prefix)
    body = {k: v for k, v in sd.items() if not k.startswith("head.")}
    assert set(back) == set(body)
    for k in body:
        np.testing.assert_array_equal(back[k], body[k], err_msg=k)


def test_google_query_kernel_head_split_matches_transpose_for_scores():
    """Head h of the Google (width, heads, dh) kernel == output channels [h*dh, (h+1)*dh)."""
    sd = _sd()
    g = reference.to_google_npz(sd, num_heads=HEADS, style="augreg")
    wq = sd["transformer.encoder.layer.0.attn.query.weight"]
    kq = g["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
    ko = g["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"]
    wo = sd["transformer.encoder.layer.0.attn.out.weight"]
    for h in range(HEADS):
        np.testing.assert_array_equal(kq[:, h, :], wq[h * DH:(h + 1) * DH, :].T)
        np.testing.assert_array_equal(ko[h], wo[:, h * DH:(h + 1) * DH].T)
