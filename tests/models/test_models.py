"""Properties every variant must have (docs/model.md), with and without jit."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from msca_jax import models
from msca_jax.models import msca, shift
from tests import helpers

TEMPORAL = [v for v in helpers.ALL_VARIANTS if v[0] != "vit"]
HEAD_AXIS = [v for v in TEMPORAL if not v[0].endswith("_patch")]
# Without jit every op dispatches (and compiles) on its own, seconds per variant: one variant of
# each kind covers the eager path, jit covers them all.
EAGER = [v for v in TEMPORAL if v[0] in ("tokenshift", "msca_kv", "msca_qkv_patch")]


@functools.lru_cache(maxsize=None)
def _cached_apply(overrides: tuple):
  model = helpers.small_model(**dict(overrides))
  return lambda p, x: model.apply({"params": p}, x)


def _apply_fn(**overrides):
  """One function object per model: jax.jit reuses its compilations across tests (CI time)."""
  return _cached_apply(tuple(sorted(overrides.items())))


class VariantPropertiesTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.clip = helpers.random_clip(seed=1)
    self.params = helpers.init_params(helpers.small_model(), self.clip)

  def _logits(self, clip, **overrides):
    return self.variant(_apply_fn(**overrides))(self.params, clip)

  def _fold_zero_equals_vit(self, overrides):
    # More shift groups than heads (MSCA) or channels (TokenShift): nothing moves.
    fold_zero = dict(overrides, shift_div=helpers.SMALL["width"] + 1)
    chex.assert_trees_all_equal(self._logits(self.clip, **fold_zero), self._logits(self.clip, name="vit"))

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(*HEAD_AXIS)
  def test_fold_zero_equals_vit(self, overrides):
    self._fold_zero_equals_vit(overrides)

  @chex.variants(without_jit=True)
  @parameterized.named_parameters(*[v for v in EAGER if v in HEAD_AXIS])
  def test_fold_zero_equals_vit_eagerly(self, overrides):
    self._fold_zero_equals_vit(overrides)

  def _single_frame_circular_equals_vit(self, overrides):
    # With one frame, t-1 and t+1 wrap onto t itself: every variant is ViT.
    clip = self.clip[:, :1]
    chex.assert_trees_all_close(self._logits(clip, **overrides, boundary="circular"),
                                self._logits(clip, name="vit"), atol=1e-6)

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(*TEMPORAL)
  def test_single_frame_circular_equals_vit(self, overrides):
    self._single_frame_circular_equals_vit(overrides)

  @chex.variants(without_jit=True)
  @parameterized.named_parameters(*EAGER)
  def test_single_frame_circular_equals_vit_eagerly(self, overrides):
    self._single_frame_circular_equals_vit(overrides)

  @chex.variants(with_jit=True, without_jit=True)
  def test_vit_is_invariant_to_frame_order(self):
    chex.assert_trees_all_close(self._logits(self.clip[:, ::-1], name="vit"),
                                self._logits(self.clip, name="vit"), atol=1e-6)

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(*TEMPORAL)
  def test_temporal_variants_depend_on_frame_order(self, overrides):
    forward = self._logits(self.clip, **overrides)
    backward = self._logits(self.clip[:, ::-1], **overrides)
    self.assertGreater(float(jnp.max(jnp.abs(forward - backward))), 1e-3)

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(*TEMPORAL)
  def test_variants_differ_from_vit(self, overrides):
    diff = jnp.max(jnp.abs(self._logits(self.clip, **overrides) - self._logits(self.clip, name="vit")))
    self.assertGreater(float(diff), 1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((1, 32, 32), (3, 32, 32), (8, 16, 16), (2, 32, 48), (5, 48, 16))
  def test_shapes(self, frames, height, width):
    model = helpers.small_model(name="msca", msca_targets="kv", shift_div=4)
    clip = helpers.random_clip(batch=3, frames=frames, height=height, width=width)
    params = helpers.init_params(model, clip)
    chex.assert_shape(params["Transformer"]["posembed_input"]["pos_embedding"],
                      (1, 1 + (height // 8) * (width // 8), 64))
    logits = self.variant(lambda p, x: model.apply({"params": p}, x))(params, clip)
    chex.assert_shape(logits, (3, helpers.SMALL["num_classes"]))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)

  @chex.variants(with_jit=True)
  def test_features_are_what_the_head_reads(self):
    # The per-frame features, put through the head and averaged over frames, are the logits.
    model = helpers.small_model(name="msca", msca_targets="kv", shift_div=4, head_zeroinit=False)
    clip = helpers.random_clip(batch=2, frames=4)
    params = helpers.init_params(model, clip)
    logits, features = self.variant(
        lambda p, x: model.apply({"params": p}, x, return_features=True))(params, clip)
    chex.assert_shape(features, (2, 4, helpers.SMALL["width"]))
    chex.assert_trees_all_close(logits, model.apply({"params": params}, clip), atol=1e-5)
    head = params["head"]
    chex.assert_trees_all_close((features @ head["kernel"] + head["bias"]).mean(axis=1), logits,
                                atol=1e-5)


class AttentionHeadsTest(chex.TestCase):
  """MSCA at the attention level, against explicit slicing of the head outputs."""

  def setUp(self):
    super().setUp()
    rng = np.random.RandomState(0)
    self.q, self.k, self.v = (jnp.asarray(rng.normal(size=(2, 5, 6, 4, 8)), jnp.float32) for _ in range(3))

  @staticmethod
  def _attend(q, k, v):
    b, t, n, h, d = q.shape
    flat = lambda x: x.reshape(b * t, n, h, d)
    return jax.nn.dot_product_attention(flat(q), flat(k), flat(v)).reshape(b, t, n, h, d)

  @chex.variants(with_jit=True, without_jit=True)
  def test_qkv_equals_shifting_head_outputs(self):
    def msca_qkv(q, k, v):
      return self._attend(*msca.cross_frame_qkv(q, k, v, targets="qkv", axis="head", shift_div=4,
                                                boundary="zero"))
    got = self.variant(msca_qkv)(self.q, self.k, self.v)
    heads = np.asarray(self._attend(self.q, self.k, self.v))
    want = heads.copy()
    want[:, :-1, :, 0] = heads[:, 1:, :, 0]      # head 0 reads frame t+1
    want[:, -1, :, 0] = 0.0
    want[:, 1:, :, -1] = heads[:, :-1, :, -1]    # the last head reads frame t-1
    want[:, 0, :, -1] = 0.0
    chex.assert_trees_all_close(got, want, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_kv_shifted_head_at_clip_end_outputs_zero(self):
    def msca_kv(q, k, v):
      return self._attend(*msca.cross_frame_qkv(q, k, v, targets="kv", axis="head", shift_div=4,
                                                boundary="zero"))
    out = np.asarray(self.variant(msca_kv)(self.q, self.k, self.v))
    np.testing.assert_array_equal(out[:, -1, :, 0], 0.0)   # t+1 of the last frame is outside
    np.testing.assert_array_equal(out[:, 0, :, -1], 0.0)   # t-1 of the first frame is outside
    self.assertTrue(np.all(np.abs(out[:, :-1, :, 0]).sum(-1) > 0))
    unshifted = np.asarray(self._attend(self.q, self.k, self.v))
    np.testing.assert_allclose(out[:, :, :, 1:3], unshifted[:, :, :, 1:3], atol=1e-6)


class AttentionImplementationTest(parameterized.TestCase):

  @parameterized.parameters(
      ("auto", "gpu", jnp.bfloat16, 64, "cudnn"),
      ("auto", "gpu", jnp.float16, 128, "cudnn"),
      ("auto", "gpu", jnp.float32, 64, "xla"),     # cuDNN's fused kernel is half precision only
      ("auto", "gpu", jnp.bfloat16, 12, "xla"),    # head dim not a multiple of 8
      ("auto", "gpu", jnp.bfloat16, 256, "xla"),
      ("auto", "cpu", jnp.bfloat16, 64, "xla"),
      ("auto", "cpu", jnp.float32, 64, "xla"),
      ("auto", "tpu", jnp.bfloat16, 64, "xla"),
      ("cudnn", "cpu", jnp.float32, 64, "cudnn"),  # an explicit choice is passed through
  )
  def test_resolution(self, requested, platform, dtype, head_dim, expected):
    from msca_jax.models import vit
    self.assertEqual(vit.attention_implementation(requested, platform, dtype, head_dim), expected)


class ShiftPrimitiveTest(parameterized.TestCase):

  def test_zero_and_circular_boundaries(self):
    x = jnp.arange(1, 2 * 4 * 3 + 1, dtype=jnp.float32).reshape(2, 4, 3)   # (batch, time, channel)
    offsets = np.array([1, -1, 0])
    zero = np.asarray(shift.temporal_shift(x, offsets, "zero"))
    circ = np.asarray(shift.temporal_shift(x, offsets, "circular"))
    xn = np.asarray(x)
    np.testing.assert_array_equal(zero[:, :-1, 0], xn[:, 1:, 0])
    np.testing.assert_array_equal(zero[:, -1, 0], 0)
    np.testing.assert_array_equal(zero[:, 1:, 1], xn[:, :-1, 1])
    np.testing.assert_array_equal(zero[:, 0, 1], 0)
    np.testing.assert_array_equal(zero[:, :, 2], xn[:, :, 2])
    np.testing.assert_array_equal(circ[:, -1, 0], xn[:, 0, 0])
    np.testing.assert_array_equal(circ[:, 0, 1], xn[:, -1, 1])

  def test_patterns(self):
    np.testing.assert_array_equal(shift.head_fold_offsets(12, 12), [1] + [0] * 10 + [-1])
    np.testing.assert_array_equal(shift.head_fold_offsets(12, 4), [1] * 3 + [0] * 6 + [-1] * 3)
    np.testing.assert_array_equal(shift.channel_fold_offsets(8, 4), [1, 1, -1, -1, 0, 0, 0, 0])
    np.testing.assert_array_equal(shift.patch_interleave_offsets(1 + 6, 3), [0, 1, -1, 0, 1, -1, 0])

  def test_tokenshift_moves_only_the_cls_token(self):
    from msca_jax.models import tokenshift
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 3, 5, 8)), jnp.float32)
    y = np.asarray(tokenshift.shift_cls_token(x, shift_div=4, boundary="zero"))
    np.testing.assert_array_equal(y[:, :, 1:], np.asarray(x)[:, :, 1:])
    np.testing.assert_array_equal(y[:, :-1, 0, :2], np.asarray(x)[:, 1:, 0, :2])
    np.testing.assert_array_equal(y[:, -1, 0, :2], 0)
    np.testing.assert_array_equal(y[:, 1:, 0, 2:4], np.asarray(x)[:, :-1, 0, 2:4])
    np.testing.assert_array_equal(y[:, 0, 0, 2:4], 0)


class PrecisionAndMemoryTest(chex.TestCase):

  @parameterized.named_parameters(("vit", "vit"), ("tokenshift", "tokenshift"), ("msca", "msca"))
  def test_bfloat16_close_to_float32(self, name):
    clip = helpers.random_clip()
    fp32 = helpers.small_model(name=name, shift_div=4)
    bf16 = helpers.small_model(name=name, shift_div=4, dtype="bfloat16")
    params = helpers.init_params(fp32, clip)
    ref = fp32.apply({"params": params}, clip)
    got = jax.jit(bf16.apply)({"params": params}, clip)
    chex.assert_type(got, jnp.float32)  # logits leave the model in float32
    # Params stay float32 when computing in bfloat16.
    bf16_params = helpers.init_params(bf16, clip)
    self.assertTrue(all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(bf16_params))))
    scale = float(jnp.max(jnp.abs(ref)))
    self.assertLess(float(jnp.max(jnp.abs(got - ref))), 0.05 * scale + 0.02)

  def test_remat_gives_the_same_values_and_gradients(self):
    clip = helpers.random_clip()
    plain = helpers.small_model(name="msca", shift_div=4)
    remat = helpers.small_model(name="msca", shift_div=4, remat=True)
    params = helpers.init_params(plain, clip)
    loss = lambda model: jax.jit(jax.value_and_grad(
        lambda p: jnp.sum(model.apply({"params": p}, clip) ** 2)))(params)
    chex.assert_trees_all_close(loss(remat), loss(plain), atol=1e-5, rtol=1e-5)

  def test_dropout_and_drop_path_only_in_training(self):
    clip = helpers.random_clip()
    model = helpers.small_model(name="msca", shift_div=4, dropout_rate=0.1,
                                attention_dropout_rate=0.1, drop_path_rate=0.2)
    params = helpers.init_params(model, clip)
    reference = helpers.small_model(name="msca", shift_div=4).apply({"params": params}, clip)
    chex.assert_trees_all_close(model.apply({"params": params}, clip), reference)
    train = lambda seed: model.apply({"params": params}, clip, train=True,
                                     rngs={"dropout": jax.random.key(seed)})
    self.assertGreater(float(jnp.max(jnp.abs(train(0) - reference))), 1e-4)
    self.assertGreater(float(jnp.max(jnp.abs(train(0) - train(1)))), 1e-4)
    chex.assert_trees_all_equal(train(3), train(3))


class ParametersAndCostTest(parameterized.TestCase):

  @staticmethod
  def _abstract(config, frames=1, size=224):
    model = models.build(config)
    return jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, frames, size, size, 3), jnp.float32))["params"]

  @parameterized.parameters("vit", "tokenshift", "msca")
  def test_vit_b16_parameter_count(self, name):
    params = self._abstract(dict(name=name, variant="B/16", num_classes=400))
    self.assertEqual(sum(x.size for x in jax.tree.leaves(nn.unbox(params))), 86_106_256)

  def test_every_variant_has_exactly_vits_parameters(self):
    shapes = lambda overrides: jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(
        self._abstract(helpers.small_config(**overrides), frames=4, size=32)))
    vit = shapes(dict(name="vit"))
    for _, overrides in helpers.ALL_VARIANTS:
      self.assertEqual(shapes(overrides), vit)

  def test_parameter_names_follow_google_checkpoints(self):
    params = nn.unbox(self._abstract(helpers.small_config(), frames=1, size=32))
    block = params["Transformer"]["encoderblock_0"]
    self.assertEqual(sorted(params), ["Transformer", "cls", "embedding", "head"])
    self.assertEqual(sorted(block), ["LayerNorm_0", "LayerNorm_2", "MlpBlock_3",
                                     "MultiHeadDotProductAttention_1"])
    self.assertEqual(block["MultiHeadDotProductAttention_1"]["query"]["kernel"].shape, (64, 4, 16))
    self.assertEqual(block["MultiHeadDotProductAttention_1"]["out"]["kernel"].shape, (4, 16, 64))

  def test_every_parameter_has_logical_axes(self):
    params = self._abstract(helpers.small_config(), frames=1, size=32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]:
      self.assertIsInstance(leaf, nn.LogicallyPartitioned, path)
      self.assertEqual(len(leaf.names), leaf.value.ndim, path)
      self.assertTrue(set(leaf.names) <= set(models.LOGICAL_AXES) | {None}, path)
    specs = nn.get_partition_spec(params)
    self.assertEqual(specs["head"]["kernel"], jax.sharding.PartitionSpec("embed", "classes"))

  def test_every_variant_costs_what_vit_costs(self):
    # XLA's own FLOP count of the forward pass: shifts must add no matmul work.
    clip = jax.ShapeDtypeStruct((2, 8, 64, 64, 3), jnp.float32)
    size = dict(width=192, num_heads=4, mlp_dim=768, depth=2, patch_size=16)

    def flops(overrides):
      model = helpers.small_model(**size, **overrides)
      params = jax.eval_shape(model.init, jax.random.key(0), clip)
      return jax.jit(model.apply).lower(params, clip).cost_analysis()["flops"]

    vit = flops(dict(name="vit"))
    self.assertGreater(vit, 5e8)  # matmuls dominate, as at full size
    for name, overrides in helpers.ALL_VARIANTS[1:]:
      ratio = flops(overrides) / vit
      self.assertLess(abs(ratio - 1.0), 0.01, f"{name}: {ratio:.4f} x ViT FLOPs")


class ConfigErrorsTest(parameterized.TestCase):

  @parameterized.parameters(
      (dict(name="mscaa"), "config.model.name"),
      (dict(name="msca", msca_targets="kq"), "config.model.msca_targets"),
      (dict(name="msca", msca_axis="time"), "config.model.msca_axis"),
      (dict(boundary="reflect"), "config.model.boundary"),
      (dict(shift_div=0), "config.model.shift_div"),
      (dict(dtype="float16"), "config.model.dtype"),
      (dict(variant="H/14"), "config.model.variant"),
      (dict(num_heads=5), "config.model.num_heads"),
      (dict(num_classes=0), "config.model.num_classes"),
      (dict(drop_path_rate=1.0), "config.model.drop_path_rate"),
      (dict(attention_impl="flash"), "config.model.attention_impl"),
  )
  def test_bad_config_names_the_field(self, overrides, field):
    with pytest.raises(ValueError, match=field):
      models.build(helpers.small_config(**overrides))

  def test_moved_fraction(self):
    arch = lambda heads, width=768: dict(num_heads=heads, width=width)
    temporal = lambda **kw: models.TemporalMixing(**kw)
    self.assertEqual(models.moved_fraction(temporal(kind="msca", shift_div=12), arch(12)), 2 / 12)
    self.assertEqual(models.moved_fraction(temporal(kind="msca", shift_div=12), arch(6)), 0.0)
    self.assertEqual(models.moved_fraction(temporal(kind="tokenshift", shift_div=4), arch(12)), 0.5)
    self.assertEqual(models.moved_fraction(temporal(kind="msca", msca_axis="patch", shift_div=12),
                                           arch(12)), 2 / 12)
    self.assertEqual(models.moved_fraction(temporal(kind="none"), arch(12)), 0.0)
    with self.assertLogs(level="WARNING") as logs:
      models.build(helpers.small_config(name="msca", shift_div=12))  # 4 heads: fold 0
    self.assertIn("computes exactly the frame-wise ViT", "".join(logs.output))
    with self.assertNoLogs(level="WARNING"):
      models.build(helpers.small_config(name="vit"))  # ViT moves nothing by design: no warning

  def test_bad_inputs(self):
    model = helpers.small_model()
    with pytest.raises(ValueError, match="multiple of the patch size"):
      jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 2, 30, 32, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"\(batch, frames, height, width, 3\)"):
      jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    params = helpers.init_params(model, helpers.random_clip())
    with pytest.raises(ValueError, match="pos_embedding has shape"):
      model.apply({"params": params}, helpers.random_clip(height=48))


@pytest.mark.parametrize("boundary", ["zero", "circular"])
@pytest.mark.parametrize("targets,shift_div", [("qkv", 4), ("kv", 4), ("qv", 4), ("qk", 4),
                                               ("qk", 2), ("qk", 1)])
def test_by_shifted_output_equals_shifted_inputs(targets, shift_div, boundary, monkeypatch):
  # Head axis: the attention output moves, and the inputs that stay move the other way, instead
  # of the targets; for MSCA-QK the boundary frames' moved heads are the mean of their own V.
  # Same logits and same gradients as moving the targets (docs/tpu_compile.md#msca-at-vits-cost).
  assert msca.shifts_output(targets, "head")
  model = helpers.small_model(name="msca", msca_targets=targets, shift_div=shift_div,
                              boundary=boundary, head_zeroinit=False)
  clip = helpers.random_clip(batch=2, frames=4)
  params = helpers.init_params(model, clip)
  loss = lambda p: jnp.sum(model.apply({"params": p}, clip) ** 2)
  by_output = jax.jit(jax.value_and_grad(loss))(params)
  monkeypatch.setattr(msca, "shifts_output", lambda targets, axis: False)
  by_inputs = jax.jit(jax.value_and_grad(loss))(params)
  # The mean sums V in another order than the attention: float32 rounding.
  tolerance = 1e-4 if "v" not in targets else 1e-5
  chex.assert_trees_all_close(by_output, by_inputs, atol=tolerance / 10, rtol=tolerance)


@pytest.mark.parametrize("boundary", ["zero", "circular"])
@pytest.mark.parametrize("targets,shift_div", [("kv", 4), ("q", 3), ("qkv", 2)])
def test_patch_axis_with_grouped_tokens_equals_the_image_order(targets, shift_div, boundary,
                                                              monkeypatch):
  # The encoder holds patch-axis tokens grouped by p % shift_div so the moving patches are runs
  # (msca.group_tokens), and the projections read the moved tokens (msca.cross_frame_tokens):
  # same logits, gradients and captured maps (in the image's order) as moving Q, K, V on the
  # image's order.
  model = helpers.small_model(name="msca", msca_targets=targets, msca_axis="patch",
                              shift_div=shift_div, boundary=boundary, head_zeroinit=False)
  clip = helpers.random_clip(batch=2, frames=4)
  params = helpers.init_params(model, clip)
  loss = lambda p: jnp.sum(model.apply({"params": p}, clip) ** 2)
  maps = lambda p: model.apply({"params": p}, clip, mutable=["intermediates"])[1]
  grouped = jax.jit(jax.value_and_grad(loss))(params), maps(params)
  monkeypatch.setattr(msca, "groups_tokens", lambda axis: False)
  monkeypatch.setattr(msca, "projects_shifted_tokens", lambda axis: False)
  image_order = jax.jit(jax.value_and_grad(loss))(params), maps(params)
  # Attention sums its keys in another order: float32 rounding (gradients reach ~30 here).
  chex.assert_trees_all_close(grouped, image_order, atol=1e-4, rtol=1e-4)


def test_grouped_tokens_make_the_patch_pattern_two_runs():
  order = msca.token_order(197, 12)
  np.testing.assert_array_equal(np.sort(order), np.arange(197))
  pattern = msca.offsets("patch", num_tokens=197, num_heads=12, shift_div=12, grouped=True)
  np.testing.assert_array_equal(pattern[:, 0, 0], shift.patch_interleave_offsets(197, 12)[order])
  np.testing.assert_array_equal(pattern[:, 0, 0], [0] + [1] * 17 + [-1] * 17 + [0] * 162)


@pytest.mark.parametrize("tokens,shift_div", [(197, 12), (17, 4), (7, 3), (10, 2), (5, 1), (2, 12)])
def test_grouping_tokens_is_a_permutation_with_its_inverse_as_gradient(tokens, shift_div):
  order = msca.token_order(tokens, shift_div)
  np.testing.assert_array_equal(np.sort(order), np.arange(tokens))
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 3, tokens, 5)), jnp.float32)
  grouped = msca.group_tokens(x, shift_div)
  np.testing.assert_array_equal(grouped, np.asarray(x)[:, :, order])
  np.testing.assert_array_equal(msca.ungroup_tokens(grouped, shift_div), x)
  cotangent = jnp.asarray(np.random.RandomState(1).normal(size=grouped.shape), jnp.float32)
  grad = jax.vjp(lambda x: msca.group_tokens(x, shift_div), x)[1](cotangent)[0]
  np.testing.assert_array_equal(grad, jax.vjp(lambda x: x[:, :, order], x)[1](cotangent)[0])
