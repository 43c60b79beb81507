"""Sampling from a decoder LM with a KV cache: greedy, temperature, top-k and top-p.

Prompts of different lengths are left padded (`prompt_mask [batch, prompt]`, True on real
tokens) so that every row's last prompt token sits in the same slot and all rows decode in
lockstep. A row's positions count its real tokens only (`cumsum(mask) - 1`, as Hugging Face
does with left padding), so padding changes no logit. `generate` prefills the prompt in one
call that writes the cache, then runs one-token decode steps in a `lax.while_loop` that ends
when every row has emitted a stop token or `max_new_tokens` are out. `generate_without_cache`
recomputes the whole sequence at every step: the reference that `generate` must match.
Both also run a `Flamingo` (`mmjax.models.flamingo`) on token prompts and its `media`: the
decode steps carry each row's count of `<image>` tokens so far, so that a new token reads
the row's latest image.

Both are jit-compiled with the model and the sampling settings static. Called inside
`mmjax.sharding.activate(mesh)` with sharded params and inputs, the model's logical
constraints shard the batch (and the cache) like training.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import sharding
from mmjax.models import decoder
from mmjax.models import flamingo


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn from the logits.

  `temperature` 0 is greedy (argmax; `top_k`, `top_p` unused). Otherwise logits are divided
  by `temperature`, then only the `top_k` most likely tokens (0 = all) are kept, then only
  the smallest set of most likely tokens whose probability reaches `top_p` (nucleus; at
  least one token), and a token is drawn from what is left.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'Sampling.temperature={self.temperature} must be >= 0')
    if self.top_k < 0:
      raise ValueError(f'Sampling.top_k={self.top_k} must be >= 0 (0 = off)')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'Sampling.top_p={self.top_p} must be in (0, 1]')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def _keep_top_k(logits, k):
  """Sets all but the `k` largest of each row to -inf (ties with the k-th are kept)."""
  if k == 0 or k >= logits.shape[-1]:
    return logits
  kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def _keep_top_p(logits, top_p):
  """Keeps the most likely tokens whose probabilities, before each, sum to less than `top_p`."""
  if top_p >= 1:
    return logits
  descending = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(descending, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  smallest_kept = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1,
                          keepdims=True)
  return jnp.where(logits >= smallest_kept, logits, -jnp.inf)


def sample(logits, rng, sampling: Sampling):
  """Next tokens `[batch]` int32 from `logits [batch, vocab]`."""
  logits = logits.astype(jnp.float32)
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  logits = _keep_top_p(_keep_top_k(logits, sampling.top_k), sampling.top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_inputs(lm, prompt_tokens, prompt_embeddings, prompt_mask, media, max_new_tokens, rng,
                  sampling):
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
  if (prompt_tokens is None) == (prompt_embeddings is None):
    raise ValueError('pass exactly one of prompt_tokens and prompt_embeddings')
  is_flamingo = isinstance(lm, flamingo.Flamingo)
  if is_flamingo != (media is not None):
    raise ValueError(f'a Flamingo reads media and a DecoderLM none: got {type(lm).__name__} '
                     f'with media={None if media is None else media.shape}')
  if is_flamingo and prompt_embeddings is not None:
    raise ValueError('a Flamingo takes prompt_tokens, not prompt_embeddings')
  prompt = prompt_tokens if prompt_embeddings is None else prompt_embeddings
  if prompt.shape[:2] != prompt_mask.shape:
    raise ValueError(f'prompt shape {prompt.shape} does not start with prompt_mask shape '
                     f'{prompt_mask.shape}')
  if rng is None:
    if not sampling.greedy:
      raise ValueError(f'{sampling} draws at random: pass rng')
    rng = jax.random.key(0)
  return rng


def _decode(first_logits, next_logits, model_state, *, rng, max_new_tokens, sampling,
            stop_tokens, pad_id):
  """Samples up to `max_new_tokens`, feeding each token to `next_logits` to get the next.

  `next_logits(model_state, tokens [batch], step) -> (logits [batch, vocab], model_state)`
  gives the logits after the token emitted at `step - 1`.
  """
  batch = first_logits.shape[0]

  def is_stop(tokens):
    return functools.reduce(jnp.logical_or, [tokens == stop for stop in stop_tokens],
                            jnp.zeros_like(tokens, bool))

  def emit(state, logits):
    step, _, tokens, lengths, done, model_state = state
    new = sample(logits, jax.random.fold_in(rng, step), sampling)
    tokens = jax.lax.dynamic_update_slice_in_dim(
        tokens, jnp.where(done, pad_id, new)[:, None], step, axis=1)
    lengths = lengths + (~done).astype(jnp.int32)
    return step + 1, new, tokens, lengths, done | is_stop(new), model_state

  def body(state):
    step, last, *_, model_state = state
    logits, model_state = next_logits(model_state, last, step)
    return emit(state[:-1] + (model_state,), logits)

  def not_finished(state):
    step, *_, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  state = (jnp.int32(0), jnp.zeros(batch, jnp.int32),
           jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros(batch, jnp.int32),
           jnp.zeros(batch, bool), model_state)
  state = emit(state, first_logits)
  _, _, tokens, lengths, _, _ = jax.lax.while_loop(not_finished, body, state)
  return dict(tokens=tokens, lengths=lengths)


def _apply(lm, params, tokens, embeddings, media, *, positions, kv_mask, cache=None,
           cache_index=None, images_before=None):
  """(logits, updated cache or None) of `lm`: a `DecoderLM`, or a `Flamingo` reading `media`."""
  if media is None:
    return lm.apply(params, tokens, embeddings=embeddings, positions=positions, kv_mask=kv_mask,
                    cache=cache, cache_index=cache_index)
  if cache is None:
    return lm.apply(params, tokens, media, positions=positions, kv_mask=kv_mask), None
  return lm.apply(params, tokens, media, positions=positions, kv_mask=kv_mask, cache=cache,
                  cache_index=cache_index, images_before=images_before, method=lm.decode)


def _init_cache(lm, batch: int, max_len: int) -> dict:
  if isinstance(lm, flamingo.Flamingo):
    return flamingo.init_cache(lm, batch, max_len)
  return decoder.init_cache(lm, batch, max_len)


def _zero_padding(prompt_tokens, prompt_embeddings, prompt_mask):
  """The prompt with token 0 / zero embeddings in its padding.

  An out-of-range pad id embeds as NaN, which masked attention weights would not hide (0 * NaN).
  """
  if prompt_embeddings is None:
    return jnp.where(prompt_mask, prompt_tokens, 0), None
  return None, jnp.where(prompt_mask[..., None], prompt_embeddings, 0)


def _slots(prompt_mask, max_new_tokens):
  """`kv_mask [batch, prompt + new]` (real keys) and each slot's position, same shape."""
  batch = prompt_mask.shape[0]
  kv_mask = jnp.concatenate(
      [prompt_mask.astype(bool), jnp.ones((batch, max_new_tokens), bool)], axis=1)
  positions = jnp.maximum(jnp.cumsum(kv_mask, axis=1, dtype=jnp.int32) - 1, 0)
  return kv_mask, positions


@functools.partial(
    jax.jit, static_argnames=('lm', 'max_new_tokens', 'sampling', 'stop_tokens', 'pad_id'))
def _generate_with_cache(params, prompt_tokens, prompt_embeddings, prompt_mask, media, rng, *,
                         lm, max_new_tokens, sampling, stop_tokens, pad_id):
  batch, prompt_length = prompt_mask.shape
  prompt_tokens, prompt_embeddings = _zero_padding(prompt_tokens, prompt_embeddings, prompt_mask)
  kv_mask, positions = _slots(prompt_mask, max_new_tokens)
  cache = _init_cache(lm, batch, prompt_length + max_new_tokens)

  def count_images(tokens):
    """`[batch, l]` -> `[batch]` int32: a Flamingo's `<image>` tokens (a DecoderLM has none),
    so that each new token reads the latest image of its row."""
    if media is None:
      return jnp.zeros(batch, jnp.int32)
    return jnp.sum(tokens == lm.media_token_id, axis=1, dtype=jnp.int32)

  logits, cache = _apply(lm, params, prompt_tokens, prompt_embeddings, media,
                         positions=positions[:, :prompt_length], kv_mask=kv_mask, cache=cache,
                         cache_index=0, images_before=jnp.zeros(batch, jnp.int32))
  images = count_images(prompt_tokens)

  def next_logits(state, last_tokens, step):
    cache, images = state
    slot = prompt_length + step - 1
    logits, cache = _apply(lm, params, last_tokens[:, None], None, media,
                           positions=jax.lax.dynamic_slice_in_dim(positions, slot, 1, axis=1),
                           kv_mask=kv_mask, cache=cache, cache_index=slot, images_before=images)
    return logits[:, 0], (cache, images + count_images(last_tokens[:, None]))

  return _decode(logits[:, -1], next_logits, (cache, images), rng=rng,
                 max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stop_tokens,
                 pad_id=pad_id)


@functools.partial(
    jax.jit, static_argnames=('lm', 'max_new_tokens', 'sampling', 'stop_tokens', 'pad_id'))
def _generate_without_cache(params, prompt_tokens, prompt_embeddings, prompt_mask, media, rng, *,
                            lm, max_new_tokens, sampling, stop_tokens, pad_id):
  prompt_length = prompt_mask.shape[1]
  prompt_tokens, prompt_embeddings = _zero_padding(prompt_tokens, prompt_embeddings, prompt_mask)
  kv_mask, positions = _slots(prompt_mask, max_new_tokens)
  as_tokens = prompt_embeddings is None
  prompt = prompt_tokens if as_tokens else prompt_embeddings
  sequence = jnp.pad(prompt, [(0, 0), (0, max_new_tokens)] + [(0, 0)] * (prompt.ndim - 2))

  def logits_at(sequence, slot):
    tokens, embeddings = (sequence, None) if as_tokens else (None, sequence)
    logits, _ = _apply(lm, params, tokens, embeddings, media, positions=positions,
                       kv_mask=kv_mask)
    return jax.lax.dynamic_index_in_dim(logits, slot, axis=1, keepdims=False)

  def next_logits(sequence, last_tokens, step):
    slot = prompt_length + step - 1
    new = last_tokens[:, None]
    if not as_tokens:
      new = lm.apply(params, new, method=lm.embed).astype(sequence.dtype)
    sequence = jax.lax.dynamic_update_slice_in_dim(sequence, new, slot, axis=1)
    return logits_at(sequence, slot), sequence

  return _decode(logits_at(sequence, prompt_length - 1), next_logits, sequence, rng=rng,
                 max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stop_tokens,
                 pad_id=pad_id)


def _call(impl, lm, params, prompt_tokens, prompt_embeddings, prompt_mask, media, max_new_tokens,
          rng, sampling, stop_tokens, pad_id):
  rng = _check_inputs(lm, prompt_tokens, prompt_embeddings, prompt_mask, media, max_new_tokens,
                      rng, sampling)
  return impl(sharding.strip_boxes(params), prompt_tokens, prompt_embeddings, prompt_mask, media,
              rng, lm=lm, max_new_tokens=int(max_new_tokens), sampling=sampling,
              stop_tokens=tuple(int(token) for token in stop_tokens), pad_id=int(pad_id))


def generate(lm: nn.Module, params, *, prompt_tokens=None, prompt_embeddings=None, prompt_mask,
             max_new_tokens: int, rng=None, sampling: Sampling = Sampling(), stop_tokens=(),
             pad_id: int = 0, media=None) -> dict[str, jax.Array]:
  """Continues left-padded prompts by up to `max_new_tokens` tokens, with a KV cache.

  Args:
    lm: a `DecoderLM`, or a `Flamingo` (with `prompt_tokens` and `media`).
    params: its variables (`{'params': ...}`), boxed with logical axis names or not.
    prompt_tokens: `[batch, prompt]` int token ids, or
    prompt_embeddings: `[batch, prompt, width]` inputs to the decoder stack (e.g. text
      embeddings with image features spliced in); new tokens are embedded with `lm.embed`.
    prompt_mask: `[batch, prompt]` bool, True on real tokens; padding on the left only.
    max_new_tokens: how many tokens to sample per row at most.
    rng: key for sampling (unused when greedy).
    sampling: `Sampling` settings.
    stop_tokens: token ids that end a row; the stop token is part of the row's output.
    pad_id: written to the slots after a row has stopped.
    media: a Flamingo's `[batch, images, latents, width]` (the resampled images); a
      row's i-th `<image>` token, in the prompt or generated, starts the text of image i.

  Returns:
    `tokens [batch, max_new_tokens]` int32 and `lengths [batch]` int32, the number of
    tokens each row emitted (stop token included); `tokens[i, lengths[i]:] == pad_id`.
  """
  return _call(_generate_with_cache, lm, params, prompt_tokens, prompt_embeddings, prompt_mask,
               media, max_new_tokens, rng, sampling, stop_tokens, pad_id)


def generate_without_cache(lm: nn.Module, params, *, prompt_tokens=None, prompt_embeddings=None,
                           prompt_mask, max_new_tokens: int, rng=None,
                           sampling: Sampling = Sampling(), stop_tokens=(), pad_id: int = 0,
                           media=None) -> dict[str, jax.Array]:
  """`generate` without a cache: every step runs the model over the whole sequence."""
  return _call(_generate_without_cache, lm, params, prompt_tokens, prompt_embeddings,
               prompt_mask, media, max_new_tokens, rng, sampling, stop_tokens, pad_id)
