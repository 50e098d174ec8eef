"""pretrained.load on the layouts researchers download (transformers, timm, CLIP) and the CLIP backbone.

Each layout is checked on random weights against its reference module from transformers (frames
through both models, 1e-4), or, for timm and OpenAI CLIP, against the direct load of the same
weights renamed; a CLIP-backbone MSCA-KV against the hand-shifted NumPy reference.
"""

import argparse
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import msca_kv

from msca_jax.configs import recipe, validation
from msca_jax import models, pretrained
from msca_jax.errors import UserError
from msca_jax.models import vit
from msca_jax.train import initialise, saved_config
from tests import helpers, reference

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import save_file  # noqa: E402  (after the skips: a parity-extra test)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4
S = helpers.SMALL
CLIP_MODEL = dict(backbone="clip", layer_norm_eps=1e-5, mlp_activation="quick_gelu",
                  pixel_mean=recipe.CLIP_PIXEL_MEAN, pixel_std=recipe.CLIP_PIXEL_STD)
PROJ_DIM = 16


def _randomise(module, seed):
  """Every tensor random (LayerNorms and biases too), so that no mapping hides behind 0 or 1."""
  rng = np.random.RandomState(seed)
  with torch.no_grad():
    for tensor in module.state_dict().values():
      tensor.copy_(torch.from_numpy(rng.normal(0, 0.3, tensor.shape).astype(np.float32)))
  return module.eval()


def _numpy(module) -> dict:
  return {k: v.numpy().copy() for k, v in module.state_dict().items()}


def _template(**overrides):
  model = models.build(helpers.small_config(**overrides))
  clip = jax.ShapeDtypeStruct((1, 2, 32, 32, 3), np.float32)
  return model, jax.eval_shape(model.init, jax.random.key(0), clip)["params"]


def _frames(seed=0):
  return np.random.RandomState(seed).randint(0, 256, (2, 2, 32, 32, 3)).astype(np.uint8)


def _hf_pixels(frames, mean, std):
  """uint8 (B, T, H, W, 3) -> the normalised (B*T, 3, H, W) pixel_values a processor makes."""
  x = (frames.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
  return torch.from_numpy(x.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2).copy())


def _features(model, params, frames):
  _, features = jax.jit(lambda p, v: model.apply({"params": p}, v, return_features=True))(params, frames)
  return np.asarray(features).reshape(-1, features.shape[-1])


@pytest.fixture(scope="module")
def hf_vit():
  config = transformers.ViTConfig(
      hidden_size=S["width"], num_hidden_layers=S["depth"], num_attention_heads=S["num_heads"],
      intermediate_size=S["mlp_dim"], patch_size=S["patch_size"], image_size=32,
      hidden_act="gelu", layer_norm_eps=1e-6, attn_implementation="eager")
  return _randomise(transformers.ViTModel(config), seed=1)  # with its pooler, which is dropped


@pytest.fixture(scope="module")
def hf_clip():
  config = transformers.CLIPVisionConfig(
      hidden_size=S["width"], num_hidden_layers=S["depth"], num_attention_heads=S["num_heads"],
      intermediate_size=S["mlp_dim"], patch_size=S["patch_size"], image_size=32,
      projection_dim=PROJ_DIM, attn_implementation="eager")
  assert config.hidden_act == "quick_gelu" and config.layer_norm_eps == 1e-5
  with_projection = _randomise(transformers.CLIPVisionModelWithProjection(config), seed=2)
  tower = transformers.CLIPVisionModel(config).eval()
  # transformers 5 names CLIPVisionModel's tensors without the vision_model. prefix.
  tower.load_state_dict({k.removeprefix("vision_model."): v for k, v in with_projection.state_dict().items()
                         if k.startswith("vision_model.")})
  return with_projection, tower


@pytest.fixture(scope="module")
def hf_vit_params(hf_vit, tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "model.safetensors"
  save_file(_numpy(hf_vit), os.fspath(path))
  _, template = _template()
  return pretrained.load(path, template, with_report=True)


# ----------------------------------------------------------------------------- ViT layouts

def test_transformers_vit_features_equal_last_hidden_state(hf_vit, hf_vit_params):
  params, report = hf_vit_params
  assert "pooler.dense.weight" in report.dropped and report.zero_initialised == ["head/bias", "head/kernel"]
  model, _ = _template()
  frames = _frames()
  with torch.no_grad():
    want = hf_vit(pixel_values=_hf_pixels(frames, 0.5, 0.5)).last_hidden_state[:, 0].numpy()
  got = _features(model, params, frames)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


def test_vit_for_image_classification_in_a_bin_file(hf_vit, hf_vit_params, tmp_path):
  state = {f"vit.{k}": v for k, v in hf_vit.state_dict().items() if not k.startswith("pooler.")}
  state["classifier.weight"], state["classifier.bias"] = torch.ones(1000, S["width"]), torch.ones(1000)
  torch.save(state, tmp_path / "pytorch_model.bin")
  _, template = _template()
  params, report = pretrained.load(tmp_path / "pytorch_model.bin", template, with_report=True)
  assert {"classifier.weight", "classifier.bias"} <= set(report.dropped)
  chex.assert_trees_all_equal(nn.unbox(params), nn.unbox(hf_vit_params[0]))


def _timm_state(hf_vit) -> dict:
  """hf_vit's weights as timm's VisionTransformer names them (numpy), with a 5-class head."""
  sd = _numpy(hf_vit)
  timm = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
          "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
          "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
          "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
          "head.weight": np.ones((5, S["width"]), np.float32), "head.bias": np.ones(5, np.float32)}
  for i in range(S["depth"]):
    hf, t = f"layers.{i}.", f"blocks.{i}."
    for kind in ("weight", "bias"):
      timm[t + f"attn.qkv.{kind}"] = np.concatenate(
          [sd[hf + f"attention.{x}_proj.{kind}"] for x in "qkv"])  # fused, in q, k, v order
      for ours, theirs in (("attn.proj", "attention.o_proj"), ("norm1", "layernorm_before"),
                           ("norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
        timm[t + f"{ours}.{kind}"] = sd[hf + f"{theirs}.{kind}"]
  return timm


def test_timm_layout_equals_the_direct_load(hf_vit, hf_vit_params):
  timm = _timm_state(hf_vit)
  _, template = _template()
  params, report = pretrained.load({"state_dict": timm}, template, with_report=True)
  assert report.dropped == ["head.weight", "head.bias"]
  chex.assert_trees_all_equal(nn.unbox(params), nn.unbox(hf_vit_params[0]))


def test_training_checkpoints_are_unwrapped_ema_first_and_the_entry_is_named(hf_vit, hf_vit_params,
                                                                             tmp_path):
  """What timm's train script saves (docs/weights.md#wrapped-training-checkpoints)."""
  timm = _timm_state(hf_vit)
  ema = {k: v + 1.0 for k, v in timm.items()}  # other weights: which entry was loaded shows
  tensors = lambda sd: {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
  _, template = _template()
  want, want_ema = nn.unbox(hf_vit_params[0]), nn.unbox(pretrained.load(ema, template))
  path = tmp_path / "last.pth.tar"
  torch.save({"epoch": 3, "arch": "vit_base_patch16_224", "state_dict": tensors(timm),
              "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}},
                            "param_groups": [{"lr": 0.1, "params": [0]}]},
              "version": 2, "args": argparse.Namespace(model="vit_base_patch16_224", lr=0.1),
              "metric": 81.2, "state_dict_ema": tensors(ema)}, path)

  params, report = pretrained.load(path, template, with_report=True)
  assert report.entry == "state_dict_ema"
  assert report.summary().startswith(f"weights from {path}, entry 'state_dict_ema' (its EMA weights): ")
  chex.assert_trees_all_equal(nn.unbox(params), want_ema)
  init = {"weights": os.fspath(path), "weights_key": "state_dict", "vit_npz": "", "checkpoint": "",
          "load_head": True}
  params, report = initialise.initial_params(init, template)
  assert report.entry == "state_dict" and "entry 'state_dict': " in report.summary()
  chex.assert_trees_all_equal(nn.unbox(params), want)

  for wrapper in ({"model": tensors(timm), "optimizer": {}, "epoch": 1}, {"state_dict": tensors(timm)},
                  {"model_ema": tensors(timm), "model": tensors(ema)}, {"module": timm}):
    params, report = pretrained.load(wrapper, template, with_report=True)
    assert report.entry == next(k for k in pretrained.STATE_DICT_KEYS if k in wrapper)
    chex.assert_trees_all_equal(nn.unbox(params), want)
  assert pretrained.load(timm, template, with_report=True)[1].entry == ""

  with pytest.raises(pretrained.WeightsError, match=r"last.pth.tar: no entry 'ema' to load \(it holds "
                     r"'epoch' \(int\), 'arch' \(str\), 'state_dict' \(dict\)"):
    pretrained.load(path, template, key="ema")
  with pytest.raises(pretrained.WeightsError, match=r"entry 'optimizer' holds 'state', a dict, not a tensor"):
    pretrained.load(path, template, key="optimizer")
  with pytest.raises(pretrained.WeightsError, match=r"entry 'weights' is a dict, not a tensor, and it has none of "
                     r"the entries a training checkpoint keeps its weights under \('state_dict_ema', "):
    pretrained.load({"weights": tensors(timm), "epoch": 1}, template)

  # The converter: EMA by default, --checkpoint_key to choose, the entry in its line and metadata.
  config = os.path.join(ROOT, "configs", "vit.py")
  flags = [f"--config.model.{k}={v}" for k, v in helpers.small_config(image_size=32).items()
           if k != "name"]
  for extra, entry, weights in (([], "state_dict_ema", want_ema),
                                (["--checkpoint_key=state_dict"], "state_dict", want)):
    out = tmp_path / f"converted_{entry}"
    result = subprocess.run(
        [sys.executable, "-m", "msca_jax.tools.convert_torch", f"--checkpoint={path}",
         f"--config={config}", *flags, f"--output={out}", *extra],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"wrote params checkpoint to {out} (from entry {entry!r})"
    assert pretrained.read_params_metadata(out)["entry"] == entry
    chex.assert_trees_all_equal(nn.unbox(pretrained.restore_params(out, template)), weights)


# ----------------------------------------------------------------------------- CLIP layouts

def test_transformers_clip_pooler_output_and_projection(hf_clip, tmp_path):
  with_projection, tower = hf_clip
  path = tmp_path / "model.safetensors"
  save_file(_numpy(with_projection), os.fspath(path))
  frames = _frames(seed=3)
  pixels = _hf_pixels(frames, recipe.CLIP_PIXEL_MEAN, recipe.CLIP_PIXEL_STD)
  with torch.no_grad():
    pooled = tower(pixel_values=pixels).pooler_output.numpy()
    embeds = with_projection(pixel_values=pixels).image_embeds.numpy()
  assert np.abs(pooled).max() > 0.1 and np.abs(embeds).max() > 0.1

  model, template = _template(**CLIP_MODEL)
  params, report = pretrained.load(path, template, with_report=True)
  assert report.dropped == ["proj (config.model.proj_dim is 0)"]
  np.testing.assert_allclose(_features(model, params, frames), pooled, atol=TOLERANCE, rtol=0)

  model, template = _template(**CLIP_MODEL, proj_dim=PROJ_DIM)
  params = pretrained.load(path, template)
  np.testing.assert_allclose(_features(model, params, frames), embeds, atol=TOLERANCE, rtol=0)


def _hf_clip_to_openai(sd: dict) -> dict:
  """transformers' CLIPVisionModelWithProjection names -> OpenAI CLIP's visual tower names."""
  v = "vision_model."
  out = {"class_embedding": sd[v + "embeddings.class_embedding"],
         "positional_embedding": sd[v + "embeddings.position_embedding.weight"],
         "conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
         "proj": sd["visual_projection.weight"].T.copy()}
  for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    out[f"{ours}.weight"], out[f"{ours}.bias"] = sd[f"{v}{theirs}.weight"], sd[f"{v}{theirs}.bias"]
  for i in range(S["depth"]):
    hf, o = f"{v}encoder.layers.{i}.", f"transformer.resblocks.{i}."
    out[o + "attn.in_proj_weight"] = np.concatenate([sd[hf + f"self_attn.{x}_proj.weight"] for x in "qkv"])
    out[o + "attn.in_proj_bias"] = np.concatenate([sd[hf + f"self_attn.{x}_proj.bias"] for x in "qkv"])
    for kind in ("weight", "bias"):
      for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                           ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        out[o + f"{ours}.{kind}"] = sd[hf + f"{theirs}.{kind}"]
  return out


def test_openai_clip_layout_equals_the_transformers_load(hf_clip, tmp_path):
  sd = _numpy(hf_clip[0])
  _, template = _template(**CLIP_MODEL, proj_dim=PROJ_DIM)
  direct = pretrained.load(sd, template)
  # A whole open_clip model: the visual tower under visual., the text tower beside it.
  whole = {f"visual.{k}": torch.from_numpy(v) for k, v in _hf_clip_to_openai(sd).items()}
  whole.update({"positional_embedding": torch.zeros(5, 8), "logit_scale": torch.ones(()),
                "transformer.resblocks.0.ln_1.weight": torch.ones(8)})
  torch.save(whole, tmp_path / "open_clip_pytorch_model.bin")
  params, report = pretrained.load(tmp_path / "open_clip_pytorch_model.bin", template, with_report=True)
  assert "logit_scale" in report.dropped
  chex.assert_trees_all_equal(nn.unbox(params), nn.unbox(direct))


# ----------------------------------------------------------------------------- the CLIP backbone's temporal models

def _reference_to_openai(sd: dict) -> dict:
  """The NumPy reference's layout with CLIP's extra pieces -> OpenAI CLIP's visual tower names."""
  e = "transformer.embeddings."
  out = {"class_embedding": sd[e + "cls_token"].reshape(-1),
         "positional_embedding": sd[e + "position_embeddings"][0],
         "conv1.weight": sd[e + "patch_embeddings.weight"], "proj": sd["proj"],
         "ln_pre.weight": sd[e + "ln_pre.weight"], "ln_pre.bias": sd[e + "ln_pre.bias"],
         "ln_post.weight": sd["transformer.encoder.encoder_norm.weight"],
         "ln_post.bias": sd["transformer.encoder.encoder_norm.bias"]}
  for i in range(S["depth"]):
    r, o = f"transformer.encoder.layer.{i}.", f"transformer.resblocks.{i}."
    for kind in ("weight", "bias"):
      out[o + ("attn.in_proj_weight" if kind == "weight" else "attn.in_proj_bias")] = np.concatenate(
          [sd[r + f"attn.{x}.{kind}"] for x in ("query", "key", "value")])
      for ours, theirs in (("attn.out_proj", "attn.out"), ("ln_1", "attention_norm"),
                           ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn.fc1"), ("mlp.c_proj", "ffn.fc2")):
        out[o + f"{ours}.{kind}"] = sd[r + f"{theirs}.{kind}"]
  return out


@pytest.mark.parametrize("overrides", [
    dict(name="msca", msca_targets="kv", msca_axis="head", shift_div=4),
    dict(name="msca", msca_targets="kv", msca_axis="patch", shift_div=4),
    dict(name="tokenshift", shift_div=4),
], ids=["msca_kv_head", "msca_kv_patch", "tokenshift"])
def test_clip_backbone_temporal_models_match_the_hand_shifted_reference(overrides):
  rng = np.random.RandomState(7)
  sd = helpers.reference_state_dict(seed=8)
  del sd["transformer.embeddings.patch_embeddings.bias"]
  sd["transformer.embeddings.ln_pre.weight"] = (1 + 0.2 * rng.randn(S["width"])).astype(np.float32)
  sd["transformer.embeddings.ln_pre.bias"] = (0.2 * rng.randn(S["width"])).astype(np.float32)
  sd["proj"] = (rng.randn(S["width"], 24) / 8).astype(np.float32)
  sd["head.weight"] = rng.randn(S["num_classes"], 24).astype(np.float32)
  model, template = _template(**CLIP_MODEL, proj_dim=24, **overrides)
  params = nn.unbox(pretrained.load(_reference_to_openai(sd), template))
  params["head"] = {"kernel": sd["head.weight"].T, "bias": sd["head.bias"]}

  clip = np.asarray(helpers.random_clip(seed=9, batch=2, frames=4))  # floats in [-1, 1]
  normalised = ((clip + 1) / 2 - np.array(recipe.CLIP_PIXEL_MEAN)) / np.array(recipe.CLIP_PIXEL_STD)
  o = dict(overrides)
  want = reference.forward(sd, normalised, num_heads=S["num_heads"], model=o.pop("name"), clip=True,
                           **o)
  got = np.asarray(jax.jit(model.apply)({"params": params}, clip))
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


# ----------------------------------------------------------------------------- the model and config pieces

def test_default_pixel_mapping_is_unchanged():
  frames = _frames()
  old = np.asarray(frames, np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
  new = np.asarray(vit.normalise_pixels(frames, vit.DEFAULT_PIXEL_MEAN, vit.DEFAULT_PIXEL_STD))
  np.testing.assert_array_equal(new, old)
  floats = np.asarray(helpers.random_clip())
  assert vit.normalise_pixels(floats, vit.DEFAULT_PIXEL_MEAN, vit.DEFAULT_PIXEL_STD) is floats
  # CLIP's statistics reach uint8 and [-1, 1] float inputs alike.
  clip_u8 = vit.normalise_pixels(frames, recipe.CLIP_PIXEL_MEAN, recipe.CLIP_PIXEL_STD)
  clip_f = vit.normalise_pixels(old, recipe.CLIP_PIXEL_MEAN, recipe.CLIP_PIXEL_STD)
  np.testing.assert_allclose(clip_u8, clip_f, atol=1e-5)


def test_clip_config_argument_combines_and_old_configs_read_as_vit():
  config = msca_kv.get_config("clip,demo")
  m = config.model
  assert (m.backbone, m.proj_dim, m.layer_norm_eps, m.mlp_activation) == ("clip", 512, 1e-5, "quick_gelu")
  assert tuple(m.pixel_mean) == recipe.CLIP_PIXEL_MEAN and config.data.pixel_std is not None
  config.data.pixel_std = (0.3, 0.3, 0.3)  # the data field is the model's
  assert tuple(m.pixel_std) == (0.3, 0.3, 0.3)
  model = models.build(m)
  video = jax.ShapeDtypeStruct((1, 2, 32, 32, 3), np.uint8)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), video)["params"])
  assert "pre_norm" in params["Transformer"] and "bias" not in params["embedding"]
  assert params["proj"]["kernel"].shape == (64, 512) and params["head"]["kernel"].shape == (512, 8)
  _, features = jax.eval_shape(lambda p, v: model.apply({"params": p}, v, return_features=True),
                               params, video)
  assert features.shape == (1, 2, 512)
  # A config saved before the backbone fields existed is the ViT.
  old = {k: v for k, v in msca_kv.get_config("demo").model.to_dict().items()
         if k not in ("backbone", "proj_dim", "layer_norm_eps", "mlp_activation", "pixel_mean", "pixel_std")}
  assert saved_config.differences(old, msca_kv.get_config("demo").model) == []
  assert [d[0] for d in saved_config.differences(old, m)][-6:] == [
      "backbone", "proj_dim", "layer_norm_eps", "mlp_activation", "pixel_mean", "pixel_std"]
  with pytest.raises(ValueError, match="config.model.proj_dim = 16: only the 'clip' backbone"):
    models.build(helpers.small_config(proj_dim=16))


def test_init_weights_is_validated(tmp_path):
  config = msca_kv.get_config("demo")
  config.init.weights = os.fspath(tmp_path / "nowhere.safetensors")
  with pytest.raises(UserError, match="config.init.weights = .*nowhere.safetensors.*no such file"):
    validation._check_init(config.init)
  (tmp_path / "w.safetensors").write_bytes(b"x")
  config.init.weights = os.fspath(tmp_path / "w.safetensors")
  config.init.vit_npz = os.fspath(tmp_path / "w.safetensors")
  with pytest.raises(UserError, match="set one of weights, vit_npz, checkpoint, not weights and vit_npz"):
    validation._check_init(config.init)
  config.init.vit_npz = ""
  (tmp_path / "w.ckpt").write_bytes(b"x")
  config.init.weights = os.fspath(tmp_path / "w.ckpt")
  with pytest.raises(UserError, match=r"expected a file ending in \.npz, \.safetensors, \.bin"):
    validation._check_init(config.init)


# ----------------------------------------------------------------------------- bad input

def test_bad_weights_fail_in_one_line_before_anything_runs(hf_vit, hf_clip, tmp_path):
  _, vit_template = _template()
  good = tmp_path / "good.safetensors"
  save_file(_numpy(hf_vit), os.fspath(good))
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(good.read_bytes()[:-100])
  listed = tmp_path / "listed.bin"
  torch.save([torch.ones(3)], listed)
  nested = tmp_path / "nested.bin"
  torch.save({"encoder": {"weight": torch.ones(3)}}, nested)
  clip = tmp_path / "clip.safetensors"
  save_file(_numpy(hf_clip[0]), os.fspath(clip))
  unknown = tmp_path / "unknown.safetensors"
  save_file({"backbone.stem.weight": np.ones(3, np.float32)}, os.fspath(unknown))
  _, wider = _template(mlp_dim=128)

  cases = [
      (truncated, vit_template, "truncated.safetensors: not a readable .safetensors file"),
      (listed, vit_template, "listed.bin: not a plain state dict of tensors: expected a state dict"),
      (nested, vit_template, "nested.bin: not a plain state dict of tensors: entry 'encoder' is a dict, not a tensor"),
      (good, wider, "good.safetensors: parameter 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias' "
                    "has shape (96,) in the checkpoint, but the model expects (128,)"),
      (clip, vit_template, "clip.safetensors: a CLIP checkpoint (transformers CLIPVisionModel), but "
                           "config.model.backbone is 'vit': use the clip config argument"),
      (good, _template(**CLIP_MODEL)[1], "good.safetensors: a ViT checkpoint (transformers ViTModel"),
      (unknown, vit_template, "unknown weights layout: expected one of Google ViT .npz, "),
  ]
  for path, template, message in cases:
    init = {"weights": os.fspath(path), "vit_npz": "", "checkpoint": "", "load_head": True}
    with pytest.raises(pretrained.WeightsError) as error:
      initialise.initial_params(init, template)  # the trainer's first step, before any compile
    text = str(error.value)
    assert message in text and "\n" not in text, text
    assert os.fspath(path) in text
  assert "'backbone.stem.weight'" in text  # the unknown layout names the keys it found
