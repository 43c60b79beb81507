"""Decoder-only language model of the Llama family: the LM under LLaVA, Flamingo, Chameleon.

Pre-norm blocks `x + attn(rms_norm(x))`, `x + swiglu(rms_norm(x))` with rotary positions
and grouped-query attention, a final RMSNorm and an `lm_head` (or the token embedding,
tied). Matches Hugging Face `LlamaForCausalLM` (`mmjax.convert.hf_llama`); with QK-norm and
the 'swin' norm placement, the text decoder of `ChameleonForConditionalGeneration`.

    lm = DecoderLM(vocab_size=32000, width=4096, depth=32, num_heads=32, num_kv_heads=8,
                   mlp_dim=14336)
    logits, _ = lm.apply({'params': params}, tokens)              # [b, l, vocab] float32
    cache = lm.init_cache(batch, max_len)
    logits, cache = lm.apply({'params': params}, prompt, cache=cache, cache_index=0)
    logits, cache = lm.apply({'params': params}, next_tokens, cache=cache,
                             cache_index=prompt.shape[1])

A parent module calls `self.lm.embed(tokens)` and `self.lm(embeddings=...)` to splice
other modalities into the embedded sequence (LLaVA), and `self.lm.head(x)` for the logits
of its own decoder stack (Flamingo). `init_cache`, `decode`, `embed` and `check_prompt` are
the decoder protocol of `mmjax.generate`.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.models import layers

# Logical axes of a cache array `[depth, batch, max_len, num_kv_heads, head_dim]`.
CACHE_AXES = ('layers', 'act_batch', 'act_length', 'act_heads', None)


def check_prompt_tokens(tokens, mask, vocab_size: int):
  """Raises if a real prompt token is not a token id of the vocabulary (host-side).

  Args:
    tokens: `[batch, prompt]` int (numpy); the padding (`mask` False) is not read.
    mask: `[batch, prompt]` bool, True on real tokens.
    vocab_size: ids must be in `[0, vocab_size)`.

  Raises:
    ValueError: naming the first row, position and id out of range (an id past the
      embedding table would embed as NaN, a negative one wrap around).
  """
  tokens = np.asarray(tokens)
  bad = np.asarray(mask, bool) & ((tokens < 0) | (tokens >= vocab_size))
  if bad.any():
    row, position = np.argwhere(bad)[0]
    raise ValueError(f'prompt row {row}, position {position}: token id '
                     f'{tokens[row, position]} is outside the vocabulary [0, {vocab_size})')


NORM_PLACEMENTS = ('pre', 'swin')


class DecoderBlock(nn.Module):
  """One decoder layer; x is `[batch, length, width]`.

  `norm_placement='pre'` (Llama): `h = x + attn(rms_norm(x))`, `out = h + swiglu(rms_norm(h))`;
  'swin' (Chameleon-34B's reordering, HF `ChameleonSwinDecoderLayer`): the norms move onto
  the branch outputs, `h = x + rms_norm(attn(x))`, `out = h + rms_norm(swiglu(h))`. The
  norms are `ln_attn` and `ln_mlp` either way. `qk_norm` is `layers.Attention`'s.
  `dropout_rate` drops branch outputs before the residual add, only when the caller passes
  a 'dropout' rng (training; `apply(..., rngs={'dropout': rng})`), else it is the identity.

  Returns `(x, new_cache)` (new_cache None without a cache) so that `nn.scan` can stack it.
  """
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  attention_bias: bool = False
  qk_norm: bool = False
  norm_placement: str = 'pre'
  dropout_rate: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, kv_mask, cache, cache_index):
    if self.norm_placement not in NORM_PLACEMENTS:
      raise ValueError(f'norm_placement={self.norm_placement!r}; use one of {NORM_PLACEMENTS}')
    constrain = lambda y: nn.with_logical_constraint(y, ('act_batch', 'act_length', 'act_embed'))
    pre = self.norm_placement == 'pre'
    ln_attn = layers.RMSNorm(self.norm_eps, self.dtype, name='ln_attn')
    ln_mlp = layers.RMSNorm(self.norm_eps, self.dtype, name='ln_mlp')
    dropout = nn.Dropout(self.dropout_rate, deterministic=not self.has_rng('dropout'))
    x = constrain(x)
    attention = layers.Attention(
        self.num_heads, causal=True, dtype=self.dtype, num_kv_heads=self.num_kv_heads,
        head_dim=self.head_dim, use_bias=self.attention_bias, rope_theta=self.rope_theta,
        qk_norm=self.qk_norm, name='attn')
    h = attention(ln_attn(x) if pre else x, positions=positions, kv_mask=kv_mask, cache=cache,
                  cache_index=cache_index)
    if cache is not None:
      h, cache = h
    x = constrain(x + dropout(h if pre else ln_attn(h)))
    h = layers.GatedMlp(self.mlp_dim, 'silu', self.dtype, name='mlp')(ln_mlp(x) if pre else x)
    x = constrain(x + dropout(h if pre else ln_mlp(h)))
    return x, cache


class DecoderStack(nn.Module):
  """`depth` DecoderBlocks: `[batch, length, width]` -> (same shape, new cache or None).

  `scan=True` stacks the block parameters on a leading `layers` axis (`blocks`), else they
  are `block_{i}`; the cache has a leading `depth` axis either way.
  """
  depth: int
  block: dict
  scan: bool = True
  remat: bool | str = False

  @nn.compact
  def __call__(self, x, positions, kv_mask, cache, cache_index):
    block = layers.remat_block(DecoderBlock, self.remat, self.scan)
    if self.scan:
      stack = nn.scan(
          block, variable_axes={'params': 0, layers.DIAGNOSTICS: 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=self.depth,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x, cache = stack(name='blocks', **self.block)(x, positions, kv_mask, cache, cache_index)
    else:
      layer_caches = []
      for i in range(self.depth):
        layer_cache = None if cache is None else {name: c[i] for name, c in cache.items()}
        x, layer_cache = block(name=f'block_{i}', **self.block)(
            x, positions, kv_mask, layer_cache, cache_index)
        layer_caches.append(layer_cache)
      if cache is not None:
        cache = {name: jnp.stack([c[name] for c in layer_caches]) for name in cache}
    if cache is not None:
      cache = {name: nn.with_logical_constraint(c, CACHE_AXES) for name, c in cache.items()}
    return x, cache


class DecoderLM(nn.Module):
  """Token ids or embeddings `[batch, length]` -> next-token logits `[batch, length, vocab]`.

  `head_dim` defaults to `width // num_heads`; `tie_embeddings` computes the logits with
  the token embedding table instead of an `lm_head`; `attention_bias` gives the query,
  key, value and output projections biases. `qk_norm`, `norm_placement` and `dropout_rate`
  are `DecoderBlock`'s (Chameleon: `qk_norm=True`, 'pre' or 'swin'). `remat` is a
  `layers.REMAT_POLICIES` name, or True (full) / False.
  """
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  scan: bool = True
  remat: bool | str = False
  dtype: layers.Dtype = jnp.float32
  attention_bias: bool = False
  qk_norm: bool = False
  norm_placement: str = 'pre'
  dropout_rate: float = 0.0

  def setup(self):
    self.token_embed = self.param(
        'token_embed',
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ('vocab', 'embed')),
        (self.vocab_size, self.width), jnp.float32)
    self.decoder = DecoderStack(self.depth, self.block_config(), self.scan, self.remat)
    self.ln_final = layers.RMSNorm(self.norm_eps, self.dtype)
    if not self.tie_embeddings:
      self.lm_head = layers.Dense(self.vocab_size, ('embed', 'vocab'), use_bias=False,
                                  kernel_init=nn.initializers.lecun_normal, dtype=self.dtype)

  @nn.nowrap
  def block_config(self) -> dict:
    """The `DecoderBlock` kwargs of this LM's layers (a parent running them itself, as
    Flamingo, builds its blocks from them). Works on an unbound module."""
    return dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, mlp_dim=self.mlp_dim,
                head_dim=self.head_dim, rope_theta=self.rope_theta, norm_eps=self.norm_eps,
                attention_bias=self.attention_bias, qk_norm=self.qk_norm,
                norm_placement=self.norm_placement, dropout_rate=self.dropout_rate,
                dtype=self.dtype)

  def embed(self, tokens):
    """`[batch, length]` int -> `[batch, length, width]` in `dtype`."""
    # Gather the (possibly sharded) table before the lookup, as FSDP does for every weight.
    table = nn.with_logical_constraint(self.token_embed, (None, None))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))

  def __call__(self, tokens=None, *, embeddings=None, positions=None, kv_mask=None, cache=None,
               cache_index=None):
    """Exactly one of `tokens [b, l]` / `embeddings [b, l, width]` -> (logits, new cache).

    `positions [b, l]` int feed the rotary embedding (default `arange(l)` per row, offset
    by `cache_index` with a cache). `kv_mask [b, keys]` is True for real keys (False:
    padding), `keys = l` without a cache and `max_len` with one; default all True.
    Causal: the query in slot s sees key slots <= s, where s = j without a cache and
    `cache_index + j` with one. `cache` is None or `init_cache(...)`'s dict; `cache_index`
    an int32 scalar, the slot of this call's first token (`cache_index + l <= max_len`:
    XLA clamps a write past the end). Returns (logits `[b, l, vocab]` float32, the
    updated cache or None).
    """
    if (tokens is None) == (embeddings is None):
      raise ValueError('pass exactly one of tokens and embeddings')
    if (cache is None) != (cache_index is None):
      raise ValueError('pass cache and cache_index together')
    x = self.embed(tokens) if embeddings is None else embeddings.astype(self.dtype)
    if positions is None:
      first_slot = 0 if cache is None else cache_index
      positions = jnp.broadcast_to(first_slot + jnp.arange(x.shape[1]), x.shape[:2])
    x, cache = self.decoder(x, positions, kv_mask, cache, cache_index)
    return self.head(x), cache

  def head(self, x):
    """The decoder stack's output `[batch, length, width]` -> logits `[batch, length, vocab]`
    float32: `ln_final`, then `lm_head` (or the token embedding table, tied)."""
    x = self.ln_final(x)
    if self.tie_embeddings:
      logits = jnp.einsum('ble,ve->blv', x, self.token_embed.astype(self.dtype))
    else:
      logits = self.lm_head(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32),
                                      ('act_batch', 'act_length', None))

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """Zeros `{'key', 'value'}`, each `[depth, batch, max_len, num_kv_heads, head_dim]` in
    `dtype` (default the compute dtype). Works on an unbound module."""
    head_dim = self.head_dim or self.width // self.num_heads
    shape = (self.depth, batch, max_len, self.num_kv_heads, head_dim)
    dtype = self.dtype if dtype is None else dtype
    return {'key': jnp.zeros(shape, dtype), 'value': jnp.zeros(shape, dtype)}

  def decode(self, tokens=None, *, embeddings=None, context=None, positions=None, kv_mask=None,
             cache=None, cache_index=None):
    """`__call__` as `mmjax.generate.Decoder.decode`: (logits `[b, l, vocab]` float32, new
    cache or None). A plain LM reads no `context` (it must be None)."""
    if context is not None:
      raise ValueError(f'a DecoderLM reads no context, got one of shape {context.shape} (a '
                       'Flamingo reads media, a LLaVA image features)')
    return self(tokens, embeddings=embeddings, positions=positions, kv_mask=kv_mask,
                cache=cache, cache_index=cache_index)

  @nn.nowrap
  def check_prompt(self, tokens, mask, context=None):
    """`mmjax.generate.Decoder.check_prompt`: every real token of `tokens [batch, prompt]`
    (numpy; `mask [batch, prompt]` bool) is in the vocabulary (`check_prompt_tokens`).
    Works on an unbound module."""
    del context  # `decode` refuses one
    check_prompt_tokens(tokens, mask, self.vocab_size)
