"""The CPU-fast GELU, LayerNorm and attention equal jax's and flax's in values and gradients."""

from absl.testing import absltest, parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msca_jax.models import layers


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


class GeluTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_exact_gelu_and_its_gradient(self):
    x = _normal(0, (4, 257), scale=4.0)
    ours = self.variant(layers.gelu)
    chex.assert_trees_all_close(ours(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
    grad = lambda f: jax.grad(lambda y: jnp.sum(f(y) * jnp.cos(y)))(x)
    chex.assert_trees_all_close(grad(layers.gelu), grad(lambda y: jax.nn.gelu(y, approximate=False)),
                                atol=1e-6)


class LayerNormTest(chex.TestCase, parameterized.TestCase):

  def _both(self, x_shape, dtype):
    params = {"scale": 1.0 + _normal(1, x_shape[-1:], 0.1), "bias": _normal(2, x_shape[-1:], 0.1)}
    ours = layers.LayerNorm(epsilon=1e-6, dtype=dtype)
    flax_ln = nn.LayerNorm(epsilon=1e-6, dtype=dtype)
    return params, (lambda p, x: ours.apply({"params": p}, x)), (lambda p, x: flax_ln.apply({"params": p}, x))

  @chex.variants(with_jit=True, without_jit=True)
  def test_values_and_gradients_equal_flax(self):
    shape = (2, 3, 5, 48)
    params, ours, theirs = self._both(shape, jnp.float32)
    x = _normal(3, shape, 2.0) + 0.5
    dy = _normal(4, shape)
    chex.assert_trees_all_close(self.variant(ours)(params, x), theirs(params, x), atol=1e-5)

    def grads(f):
      return jax.grad(lambda p, y: jnp.sum(f(p, y) * dy), argnums=(0, 1))(params, x)
    got, want = self.variant(lambda: grads(ours))(), grads(theirs)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=1e-5)

  def test_params_match_flax_layer_norm(self):
    x = jnp.zeros((2, 7, 16))
    ours = nn.meta.unbox(layers.LayerNorm().init(jax.random.key(0), x))
    theirs = nn.LayerNorm().init(jax.random.key(0), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, theirs)
    chex.assert_trees_all_close(ours, theirs)

  def test_bfloat16_output_with_float32_statistics(self):
    shape = (2, 4, 32)
    params, ours, theirs = self._both(shape, jnp.bfloat16)
    x = (_normal(5, shape) * 3 + 100.0).astype(jnp.bfloat16)   # a large mean: stats need fp32
    y = ours(params, x)
    self.assertEqual(y.dtype, jnp.bfloat16)
    chex.assert_trees_all_close(y.astype(jnp.float32), theirs(params, x).astype(jnp.float32),
                                atol=0.05)
    dx = jax.grad(lambda x: jnp.sum(ours(params, x).astype(jnp.float32)))(x)
    self.assertEqual(dx.dtype, jnp.bfloat16)


class SoftmaxAttentionTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(3, 4)   # an odd batch runs as one chain, an even one as two halves
  def test_values_and_gradients_equal_dot_product_attention(self, batch):
    shape = (batch, 17, 4, 8)   # (batch, tokens, heads, head_dim)
    q, k, v = (_normal(i, shape, 1.5) for i in range(3))
    dout = _normal(3, shape)
    ours = self.variant(layers.softmax_attention)
    reference = lambda *a: jax.nn.dot_product_attention(*a, implementation="xla")
    chex.assert_trees_all_close(ours(q, k, v), reference(q, k, v), atol=1e-5)

    def grads(f):
      return jax.grad(lambda *a: jnp.sum(f(*a) * dout), argnums=(0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(self.variant(lambda: grads(layers.softmax_attention))(),
                                grads(reference), atol=1e-5)

  def test_large_logits_stay_finite(self):
    shape = (1, 9, 2, 4)
    q, k, v = (_normal(i, shape, 100.0) for i in range(3))
    out, grads = jax.value_and_grad(lambda *a: jnp.sum(layers.softmax_attention(*a)),
                                    argnums=(0, 1, 2))(q, k, v)
    self.assertTrue(np.isfinite(out))
    for g in grads:
      self.assertTrue(np.all(np.isfinite(g)))

  def test_bfloat16(self):
    shape = (2, 11, 3, 8)
    q, k, v = (_normal(i, shape).astype(jnp.bfloat16) for i in range(3))
    out = layers.softmax_attention(q, k, v)
    self.assertEqual(out.dtype, jnp.bfloat16)
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    chex.assert_trees_all_close(out.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2)
    dq = jax.grad(lambda q: jnp.sum(layers.softmax_attention(q, k, v).astype(jnp.float32)))(q)
    self.assertEqual(dq.dtype, jnp.bfloat16)

  def test_works_under_remat(self):
    shape = (2, 5, 2, 4)
    q, k, v = (_normal(i, shape) for i in range(3))
    f = lambda q: jnp.sum(layers.softmax_attention(q, k, v) ** 2)
    chex.assert_trees_all_close(jax.grad(jax.checkpoint(f))(q), jax.grad(f)(q), atol=1e-6)


if __name__ == "__main__":
  absltest.main()
