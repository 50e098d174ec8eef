"""GELU, LayerNorm and softmax attention, written for XLA:CPU's speed, the reference's numbers.

The math is the reference's (docs/model.md: exact-erf GELU, LayerNorm eps 1e-6, softmax
attention scaled by head_dim ** -0.5); only the formulation differs from flax's and jax's, for
reasons measured on the ViT-B/16 8x224 train step on CPU (README, Measured):

* `gelu` is 0.5 x (1 + erf(x / sqrt 2)), PyTorch's formula. `jax.nn.gelu(approximate=False)`
  goes through erfc, which XLA expands into a slower select chain.
* `layer_norm` has a hand-written VJP whose row and column sums are contractions (einsum).
  XLA:CPU hands a product-then-sum, `sum(a * b, -1)`, to a reduction kernel that is about 20x
  slower than the same contraction written as a dot, and autodiff of LayerNorm makes several.
* `softmax_attention` works heads-major, (batch, heads, tokens, head_dim), so that XLA does not
  copy the (tokens x tokens) probabilities to transpose them, folds the scale into q, and keeps
  the unnormalised exp(s - max) with 1 / sum for the backward pass (one full-size pass fewer
  than normalising first). Its VJP is the standard one, with the row term sum(dP * P) taken as
  sum(dO * O), a (tokens x head_dim) contraction instead of a (tokens x tokens) one.

On GPU the fused cuDNN kernel is used instead (`vit.attention_implementation`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), in the erf form PyTorch uses."""
  return x * (0.5 + 0.5 * jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


def _row_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """sum(a * b, -1, keepdims=True), as a contraction."""
  return jnp.einsum("...c,...c->...", a, b)[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis, in x's dtype."""
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  width = x.shape[-1]
  x32 = x.astype(jnp.float32)
  centred = x32 - jnp.sum(x32, -1, keepdims=True) / width
  inv_std = jax.lax.rsqrt(jnp.sum(centred * centred, -1, keepdims=True) / width + epsilon)
  normed = centred * inv_std
  y = (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
  return y, (normed, inv_std, scale, bias)


def _layer_norm_bwd(epsilon, residuals, dy):
  del epsilon
  normed, inv_std, scale, bias = residuals
  width = normed.shape[-1]
  dy32 = dy.astype(jnp.float32)
  rows = lambda t: t.reshape(-1, width)
  dscale = jnp.einsum("rz,rz->z", rows(dy32), rows(normed))
  dbias = jnp.sum(rows(dy32), 0)
  g = dy32 * scale.astype(jnp.float32)
  dx = inv_std * (g - jnp.sum(g, -1, keepdims=True) / width - normed * (_row_dot(g, normed) / width))
  return dx.astype(dy.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with flax's parameters (`scale`, `bias`); stats in float32."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (width,))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                      (width,))
    return layer_norm(x.astype(self.dtype), scale, bias, self.epsilon)


@jax.custom_vjp
def _attention_heads_major(q, k, v):
  """softmax(q k^T) v over (batch, heads, tokens, head_dim); q arrives already scaled."""
  return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
  logits = jnp.einsum("bnqh,bnkh->bnqk", q, k, preferred_element_type=jnp.float32)
  unnormalised = jnp.exp(logits - jnp.max(logits, -1, keepdims=True))
  inv_sum = 1.0 / jnp.sum(unnormalised, -1, keepdims=True)
  unnormalised = unnormalised.astype(v.dtype)
  out = (jnp.einsum("bnqk,bnkh->bnqh", unnormalised, v, preferred_element_type=jnp.float32)
         * inv_sum).astype(v.dtype)
  return out, (q, k, v, out, unnormalised, inv_sum)


def _attention_bwd(residuals, dout):
  q, k, v, out, unnormalised, inv_sum = residuals
  f32 = jnp.float32
  dout_scaled = (dout.astype(f32) * inv_sum).astype(v.dtype)    # dO / rowsum, so P = E / rowsum
  dv = jnp.einsum("bnqk,bnqh->bnkh", unnormalised, dout_scaled, preferred_element_type=f32)
  dprobs = jnp.einsum("bnqh,bnkh->bnqk", dout_scaled, v, preferred_element_type=f32)
  row_term = jnp.einsum("bnqh,bnqh->bnq", dout, out, preferred_element_type=f32)[..., None]
  dlogits = (unnormalised.astype(f32) * (dprobs - row_term * inv_sum)).astype(q.dtype)
  dq = jnp.einsum("bnqk,bnkh->bnqh", dlogits, k, preferred_element_type=f32)
  dk = jnp.einsum("bnqk,bnqh->bnkh", dlogits, q, preferred_element_type=f32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention_heads_major.defvjp(_attention_fwd, _attention_bwd)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """jax.nn.dot_product_attention's math (no mask, no bias) on (batch, tokens, heads, head_dim)."""
  scale = np.asarray(q.shape[-1] ** -0.5, q.dtype)
  to_heads = lambda t: jnp.swapaxes(t, 1, 2)
  q, k, v = to_heads(q * scale), to_heads(k), to_heads(v)
  # XLA:CPU runs each YNNPACK batched dot of this size on one thread, whatever the batch. Two
  # halves of the batch are two independent chains, which its executor runs side by side. The
  # halves are the even and odd rows, so that a sharded batch axis splits without moving data.
  halves = 2 if q.shape[0] % 2 == 0 else 1
  pairs = lambda t: t.reshape((t.shape[0] // halves, halves) + t.shape[1:])
  q, k, v = pairs(q), pairs(k), pairs(v)
  out = jnp.stack([_attention_heads_major(q[:, i], k[:, i], v[:, i]) for i in range(halves)], 1)
  return to_heads(out.reshape((-1,) + out.shape[2:]))
