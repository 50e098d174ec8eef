"""Frame-wise ViT video classifier, the backbone of every model here.

Each frame of a (B, T, H, W, 3) clip goes through the same 2-D ViT; the logits
of the T frames are averaged. Parameter names follow Google's
vision_transformer checkpoints one to one (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `encoderblock_{i}/LayerNorm_0`,
`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`, ...), so a
ViT .npz maps onto these params by name.

The 'clip' backbone is CLIP's vision tower on the same blocks: a patch embedding without bias,
a LayerNorm before the encoder (`Transformer/pre_norm`, CLIP's ln_pre), QuickGELU and LayerNorm
eps 1e-5 (set by config), `encoder_norm` as ln_post and an optional bias-free projection `proj`
before the head (docs/weights.md maps CLIP's names onto these).

Activations keep the time axis, (B, T, tokens, channels), so that the temporal
models (TokenShift, MSCA) shift along axis 1 without any reshape; attention and
dense layers only see the trailing axes. TokenShift and MSCA are selected by
`TemporalMixing` and add no parameter and no matmul FLOP.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msca_jax.models import msca, tokenshift

Dtype = Any
LN_EPSILON = 1e-6
BACKBONES = ("vit", "clip")
MLP_ACTIVATIONS = ("gelu", "quick_gelu")
# The [-1, 1] mapping of the ViT checkpoints, as mean and std of [0, 1] pixels.
DEFAULT_PIXEL_MEAN = (0.5, 0.5, 0.5)
DEFAULT_PIXEL_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class TemporalMixing:
  """How frames exchange information; kind 'none' is the frame-wise ViT."""
  kind: str = "none"  # 'none' | 'tokenshift' | 'msca'
  shift_div: int = 4
  msca_targets: str = "kv"
  msca_axis: str = "head"
  boundary: str = "zero"


def _init(initializer: Callable, names: tuple[str | None, ...]) -> Callable:
  """An initializer whose parameter carries logical axis names for sharding."""
  return nn.with_logical_partitioning(initializer, names)


def _layer_norm(name: str, dtype: Dtype, epsilon: float = LN_EPSILON) -> nn.LayerNorm:
  # Two-pass variance, as the reference computes it (flax's default is E[x^2] - E[x]^2).
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, use_fast_variance=False, name=name,
                      scale_init=_init(nn.initializers.ones, ("embed",)),
                      bias_init=_init(nn.initializers.zeros, ("embed",)))


def _drop_path(module: nn.Module, x: jnp.ndarray, rate: float, train: bool) -> jnp.ndarray:
  """Stochastic depth per clip: all frames of a clip keep or drop the branch together."""
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _activation(name: str, x: jnp.ndarray) -> jnp.ndarray:
  if name == "quick_gelu":  # OpenAI CLIP's x * sigmoid(1.702 x)
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=False)  # the reference's exact (erf) GELU


def normalise_pixels(x: jnp.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> jnp.ndarray:
  """uint8 pixels, or floats in [-1, 1] (pixel / 127.5 - 1), -> (pixel / 255 - mean) / std.

  The defaults (mean = std = 0.5) leave floats untouched and map uint8 to [-1, 1].
  """
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  if jnp.issubdtype(x.dtype, jnp.integer):
    scale, offset = 1.0 / (255.0 * std), mean / std
    if np.all(scale == scale[0]) and np.all(offset == offset[0]):  # one constant: a single fused multiply-add
      return x.astype(jnp.float32) * float(scale[0]) - float(offset[0])
    return x.astype(jnp.float32) * scale.astype(np.float32) - offset.astype(np.float32)
  if np.all(mean == 0.5) and np.all(std == 0.5):
    return x
  scale, offset = 0.5 / std, (0.5 - mean) / std
  return x.astype(jnp.float32) * scale.astype(np.float32) + offset.astype(np.float32)


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout_rate: float = 0.0
  activation: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    width = x.shape[-1]
    dense = lambda features, axes, name: nn.Dense(
        features, dtype=self.dtype, name=name,
        kernel_init=_init(nn.initializers.xavier_uniform(), axes),
        bias_init=_init(nn.initializers.normal(stddev=1e-6), axes[1:]))
    x = dense(self.mlp_dim, ("embed", "mlp"), "Dense_0")(x)
    x = nn.with_logical_constraint(x, ("batch", None, None, "mlp"))
    x = _activation(self.activation, x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = dense(width, ("mlp", "embed"), "Dense_1")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=not train)


def attention_implementation(requested: str, platform: str, dtype, head_dim: int) -> str | None:
  """The `implementation` argument of jax.nn.dot_product_attention for config.model.attention_impl.

  'auto' picks cuDNN's fused kernel where it applies (a GPU, fp16/bf16 inputs, a head dimension
  that is a multiple of 8 and at most 128) and XLA's formulation everywhere else; jax's own None
  means XLA today, so the choice is made here.
  """
  if requested == "auto":
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fused = platform == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if fused else "xla"
  return requested


class Attention(nn.Module):
  """Multi-head attention over the tokens of each frame; MSCA heads look across frames."""
  num_heads: int
  temporal: TemporalMixing = TemporalMixing()
  attention_dropout_rate: float = 0.0
  attention_impl: str = "auto"  # 'auto' | 'xla' | 'cudnn'
  grouped_tokens: bool = False  # x's tokens are in msca.token_order (the encoder's, patch axis)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    batch, frames, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    # nn.Einsum creates each kernel in its checkpoint shape, so its logical axis names hold at
    # init (DenseGeneral initialises a flattened kernel, which sharding constraints reject).
    xavier = lambda fan_in, fan_out: nn.initializers.xavier_uniform(in_axis=fan_in, out_axis=fan_out)
    project = lambda name: nn.Einsum(
        (width, self.num_heads, head_dim), "...d,dhk->...hk", dtype=self.dtype, name=name,
        kernel_init=_init(xavier((0,), (1, 2)), ("embed", "heads", "kv")),
        bias_init=_init(nn.initializers.zeros, ("heads", "kv")))
    cross_frame = self.temporal.kind == "msca"
    targets, axis = self.temporal.msca_targets, self.temporal.msca_axis
    shift_tokens = cross_frame and msca.projects_shifted_tokens(axis)
    if shift_tokens:
      moved, inside = msca.cross_frame_tokens(x, shift_div=self.temporal.shift_div,
                                              boundary=self.temporal.boundary,
                                              grouped=self.grouped_tokens)
      project_from = lambda name: (
          project(name)(x) if name[0] not in targets
          else project(name)(moved) if inside is None
          else jnp.where(inside, project(name)(moved), 0))
      q, k, v = (project_from(name) for name in ("query", "key", "value"))
    else:
      q, k, v = (project(name)(x) for name in ("query", "key", "value"))
    # A caller that makes 'intermediates' mutable asks for the probabilities; otherwise this
    # lowers to exactly the fused attention below (tests/models/test_attention_maps.py).
    capture = self.is_mutable_collection("intermediates")
    explicit = capture or (train and self.attention_dropout_rate > 0.0)
    # Shifting the output is exact for the output only: captured maps and dropout masks belong
    # to the frame the inputs were moved to, so those paths move the inputs.
    shift_output = cross_frame and not explicit and msca.shifts_output(targets, axis)
    values = v
    if cross_frame and not shift_tokens:
      q, k, v = msca.cross_frame_qkv(q, k, v, targets=targets, axis=axis,
                                     shift_div=self.temporal.shift_div,
                                     boundary=self.temporal.boundary, output_form=shift_output)

    # Frames are independent attention problems: fold time into the batch.
    q, k, v = (y.reshape(batch * frames, tokens, self.num_heads, head_dim) for y in (q, k, v))
    if explicit:
      out, weights = self._explicit_attention(q, k, v, train)
      if capture:
        weights = weights.reshape(batch, frames, self.num_heads, tokens, tokens)
        if self.grouped_tokens:  # maps are read in the image's token order
          image = np.argsort(msca.token_order(tokens, self.temporal.shift_div))
          weights = weights[..., image, :][..., image]
        self.sow("intermediates", "attention", weights)
    else:
      implementation = attention_implementation(self.attention_impl, jax.default_backend(),
                                                q.dtype, head_dim)
      out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    out = out.reshape(batch, frames, tokens, self.num_heads, head_dim)
    if shift_output:
      out = msca.cross_frame_output(out, values, targets=targets,
                                    shift_div=self.temporal.shift_div,
                                    boundary=self.temporal.boundary)
    out = nn.with_logical_constraint(out, ("batch", None, None, "heads", "kv"))
    return nn.Einsum(
        (self.num_heads, head_dim, width), "...hk,hkd->...d", dtype=self.dtype, name="out",
        kernel_init=_init(xavier((0, 1), (2,)), ("heads", "kv", "embed")),
        bias_init=_init(nn.initializers.zeros, ("embed",)))(out)

  def _explicit_attention(self, q, k, v, train: bool):
    """(output, float32 probabilities (B*T, heads, q, k) before dropout): the unfused form,
    for attention dropout (which jax.nn.dot_product_attention lacks) and for capture."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1)
    dropped = weights
    if train and self.attention_dropout_rate > 0.0:
      dropped = nn.Dropout(self.attention_dropout_rate)(weights, deterministic=False)
    return jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v.dtype), v), weights


class EncoderBlock(nn.Module):
  mlp_dim: int
  num_heads: int
  temporal: TemporalMixing = TemporalMixing()
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_impl: str = "auto"
  layer_norm_eps: float = LN_EPSILON
  mlp_activation: str = "gelu"
  grouped_tokens: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    shift_cls = self.temporal.kind == "tokenshift"

    if shift_cls:
      x = tokenshift.shift_cls_token(x, shift_div=self.temporal.shift_div, boundary=self.temporal.boundary)
    y = _layer_norm("LayerNorm_0", self.dtype, self.layer_norm_eps)(x)
    y = Attention(num_heads=self.num_heads, temporal=self.temporal,
                  attention_dropout_rate=self.attention_dropout_rate,
                  attention_impl=self.attention_impl, grouped_tokens=self.grouped_tokens,
                  dtype=self.dtype, name="MultiHeadDotProductAttention_1")(y, train)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    x = x + _drop_path(self, y, self.drop_path_rate, train)

    if shift_cls:
      x = tokenshift.shift_cls_token(x, shift_div=self.temporal.shift_div, boundary=self.temporal.boundary)
    y = _layer_norm("LayerNorm_2", self.dtype, self.layer_norm_eps)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                 activation=self.mlp_activation, dtype=self.dtype, name="MlpBlock_3")(y, train)
    x = x + _drop_path(self, y, self.drop_path_rate, train)
    return nn.with_logical_constraint(x, ("batch", None, None, "embed"))


class AddPositionEmbs(nn.Module):
  """Learned position embedding shared by all frames (no temporal embedding)."""
  grouped_by: int = 0  # x's tokens are in msca.token_order for this shift_div; 0: the image's

  @nn.compact
  def __call__(self, x):
    shape = (1,) + x.shape[-2:]
    if self.has_variable("params", "pos_embedding"):
      found = nn.meta.unbox(self.get_variable("params", "pos_embedding")).shape
      if tuple(found) != shape:
        raise ValueError(
            f"pos_embedding has shape {tuple(found)} but this input needs {shape}: the frame "
            "size differs from the one the params were built for; resize the position embedding "
            "for the new resolution (msca_jax.pretrained.resize_pos_embedding)")
    pos = self.param("pos_embedding", _init(nn.initializers.normal(stddev=0.02), (None, None, "embed")),
                     shape)
    if self.grouped_by:  # the parameter stays in the image's order, as checkpoints hold it
      pos = msca.group_tokens(pos, self.grouped_by)
    return x + pos.astype(x.dtype)


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int
  temporal: TemporalMixing = TemporalMixing()
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_impl: str = "auto"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  pre_norm: bool = False
  layer_norm_eps: float = LN_EPSILON
  mlp_activation: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    # Patch-axis MSCA: the moving patches become contiguous runs (msca.py). The output keeps
    # that order; the classifier reads only CLS, at position 0 in both. Grouping before the
    # position embedding keeps its gradient a plain sum over clips.
    grouped = self.temporal.kind == "msca" and msca.groups_tokens(self.temporal.msca_axis)
    if grouped:
      x = msca.group_tokens(x, self.temporal.shift_div)
    x = AddPositionEmbs(grouped_by=self.temporal.shift_div if grouped else 0,
                        name="posembed_input")(x)
    if self.pre_norm:
      x = _layer_norm("pre_norm", self.dtype, self.layer_norm_eps)(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    block = EncoderBlock
    if self.remat:
      # Argument 2 is `train` (self is 0): a Python bool that must stay static.
      block = nn.remat(EncoderBlock, static_argnums=(2,),
                       policy=getattr(jax.checkpoint_policies, self.remat_policy))
    for i in range(self.depth):
      # Stochastic depth grows linearly with depth, as in DeiT.
      rate = self.drop_path_rate * i / max(self.depth - 1, 1)
      x = block(mlp_dim=self.mlp_dim, num_heads=self.num_heads, temporal=self.temporal,
                dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                drop_path_rate=rate, attention_impl=self.attention_impl,
                layer_norm_eps=self.layer_norm_eps, mlp_activation=self.mlp_activation,
                grouped_tokens=grouped, dtype=self.dtype, name=f"encoderblock_{i}")(x, train)
    return _layer_norm("encoder_norm", self.dtype, self.layer_norm_eps)(x)


class VideoClassifier(nn.Module):
  """(B, T, H, W, 3) clip -> (B, num_classes) float32 logits.

  The clip is uint8 pixels or floats in [-1, 1] (pixel / 127.5 - 1); both are normalised here
  with pixel_mean / pixel_std (of [0, 1] pixels; the defaults keep [-1, 1]): the input pipeline
  sends a quarter of the bytes, and the mapping fuses into the patch embedding.
  """
  num_classes: int
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  temporal: TemporalMixing = TemporalMixing()
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  head_zeroinit: bool = True
  attention_impl: str = "auto"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  backbone: str = "vit"  # 'vit' | 'clip'
  proj_dim: int = 0  # clip: width of the bias-free `proj` between ln_post and the head; 0: none
  layer_norm_eps: float = LN_EPSILON
  mlp_activation: str = "gelu"  # 'gelu' | 'quick_gelu'
  pixel_mean: tuple[float, ...] = DEFAULT_PIXEL_MEAN
  pixel_std: tuple[float, ...] = DEFAULT_PIXEL_STD
  dtype: Dtype = jnp.float32  # compute dtype; parameters stay float32

  @nn.compact
  def __call__(self, video, *, train: bool = False, return_features: bool = False):
    """Logits, or (logits, features) with `return_features`: features are the per-frame
    pre-head embeddings (B, T, width), the CLS token after the final norm (and after `proj`
    when the clip backbone has one: then the width is proj_dim)."""
    if self.backbone not in BACKBONES:
      raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"video must be (batch, frames, height, width, 3), got shape {video.shape}")
    batch, frames, height, width, _ = video.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"frame size {height}x{width} is not a multiple of the patch size {p}")

    clip = self.backbone == "clip"
    x = video.reshape(batch * frames, height, width, 3)
    x = normalise_pixels(x, self.pixel_mean, self.pixel_std)
    x = x.astype(self.dtype)
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="embedding", use_bias=not clip,
                kernel_init=_init(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                bias_init=_init(nn.initializers.zeros, ("embed",)))(x)
    x = x.reshape(batch, frames, (height // p) * (width // p), self.width)
    cls = self.param("cls", _init(nn.initializers.zeros, (None, None, "embed")), (1, 1, self.width))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, frames, 1, self.width))
    x = jnp.concatenate([cls, x], axis=2)
    x = nn.with_logical_constraint(x, ("batch", None, None, "embed"))

    x = Encoder(depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                temporal=self.temporal, dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                drop_path_rate=self.drop_path_rate, attention_impl=self.attention_impl,
                remat=self.remat, remat_policy=self.remat_policy, pre_norm=clip,
                layer_norm_eps=self.layer_norm_eps, mlp_activation=self.mlp_activation,
                dtype=self.dtype, name="Transformer")(x, train)

    features = x[:, :, 0]
    if self.proj_dim:
      features = nn.Dense(self.proj_dim, use_bias=False, dtype=self.dtype, name="proj",
                          kernel_init=_init(nn.initializers.lecun_normal(), ("embed", None)))(features)
    head_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
    frame_logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                            kernel_init=_init(head_init, ("embed", "classes")),
                            bias_init=_init(nn.initializers.zeros, ("classes",)))(features)
    # Average the logits (not the features, not the probabilities) over frames.
    logits = frame_logits.astype(jnp.float32).mean(axis=1)
    if return_features:
      return logits, features.astype(jnp.float32)
    return logits
