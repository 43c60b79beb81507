"""Sampling from a decoder with a KV cache: greedy, temperature, top-k and top-p.

Prompts of different lengths are left padded (`prompt_mask [batch, prompt]`, True on real
tokens) so that every row's last prompt token sits in the same slot and all rows decode in
lockstep. A row's positions count its real tokens only (`cumsum(mask) - 1`, as Hugging Face
does with left padding), so padding changes no logit. `generate` prefills the prompt in one
call that writes the cache, then runs one-token decode steps in a `lax.while_loop` that ends
when every row has emitted a stop token or `max_new_tokens` are out. `generate_without_cache`
recomputes the whole sequence at every step: the reference that `generate` must match.

The model is any `Decoder` (a flax module; this module imports no model):
  `model.init_cache(batch, max_len)` -> the empty cache, any pytree (called on the unbound
    module, inside jit);
  `decode(tokens=None, *, embeddings=None, context=None, positions, kv_mask, cache=None,
    cache_index=None)` (a linen method, run as `model.apply(params, ..., method='decode')`)
    -> `(logits [batch, length, vocab] float32, new cache)`. Exactly one of `tokens [batch,
    length]` int and `embeddings [batch, length, width]`; `context` is what the model reads
    besides the text, the same at every call (None for a plain LM, a Flamingo's media, a
    LLaVA's projected image features); `positions [batch, length]` int; `kv_mask [batch,
    keys]` bool, True on real keys. With `cache` (`init_cache`'s or an earlier call's) and
    `cache_index` (int32 scalar, the slot of the call's first token), `keys = max_len` and
    the call writes its slots; the cache also carries any state of the model's own (e.g. a
    Flamingo's count of each row's `<image>` tokens). Without a cache the call is the whole
    sequence (`keys = length`) and returns None for the cache.
  `embed(tokens [batch, length]) -> [batch, length, width]` (a linen method), how
    `generate_without_cache` extends `prompt_embeddings`.
  optionally `check_prompt(tokens, mask, context)` (host-side, on the unbound module): raises
    a ValueError naming the row of a prompt the model cannot read (a token id outside its
    vocabulary, a Flamingo's `<image>` token without an image in `context`); numpy `tokens
    [batch, prompt]` int and `mask [batch, prompt]` bool (padding is not to be read).
`mmjax.models.decoder.DecoderLM`, `mmjax.models.llava.LLaVA`, `mmjax.models.flamingo`'s
`Flamingo` and `FlamingoLM`, and `mmjax.models.chameleon.Chameleon` implement it; a decoder
writing text and images takes `modalities` (`mmjax.mixed_modal.ModalityRules`).

Prompts are checked on the host before anything is jitted: every row has a real token and is
left padded (no padding after a real token), then `check_prompt` on token prompts. Prompts
that are traced (`generate` called inside `jit`) or not all on this host cannot be read and
go unchecked.

Both are jit-compiled with the model and the sampling settings static (the model must hash).
Called inside `mmjax.sharding.activate(mesh)` with sharded params and inputs, the model's
logical constraints shard the batch (and the cache) like training.
"""

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import sharding


class Decoder(Protocol):
  """What `generate` needs of a model (module docstring): a flax module with these methods,
  and optionally `check_prompt(tokens, mask, context)` (not part of the protocol's type, as
  `generate` calls it only where the model has it)."""

  def init_cache(self, batch: int, max_len: int) -> Any:
    ...

  def decode(self, tokens=None, *, embeddings=None, context=None, positions, kv_mask,
             cache=None, cache_index=None) -> tuple[jax.Array, Any]:
    ...

  def embed(self, tokens) -> jax.Array:
    ...

  def apply(self, variables, *args, method=None, **kwargs) -> Any:
    ...


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


def _check_inputs(prompt_tokens, prompt_embeddings, prompt_mask, max_new_tokens, rng, sampling):
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
  if (prompt_tokens is None) == (prompt_embeddings is None):
    raise ValueError('pass exactly one of prompt_tokens and prompt_embeddings')
  prompt = prompt_tokens if prompt_embeddings is None else prompt_embeddings
  if prompt.shape[:2] != prompt_mask.shape:
    raise ValueError(f'prompt shape {prompt.shape} does not start with prompt_mask shape '
                     f'{prompt_mask.shape}')
  if rng is None:
    if not sampling.greedy:
      raise ValueError(f'{sampling} draws at random: pass rng')
    rng = jax.random.key(0)
  return rng


def _on_host(x):
  """`x` as numpy, or None where it cannot be read here (traced, or partly on other hosts)."""
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  return np.asarray(x)


def _check_prompt(model, prompt_tokens, prompt_mask, context):
  """Raises a ValueError naming the row of an invalid prompt (module docstring).

  `prompt_mask [batch, prompt]`: every row has a real token and no padding after one (a row
  is left padded). Then `model.check_prompt` on `prompt_tokens [batch, prompt]`, if both.
  """
  mask = _on_host(prompt_mask)
  if mask is None:
    return
  mask = mask.astype(bool)
  empty = np.flatnonzero(~mask.any(axis=1))
  if empty.size:
    raise ValueError(f'prompt row {empty[0]} is empty (prompt_mask all False): a prompt needs '
                     'at least one real token')
  # Padding after a real token (right or inner padding): decoding would continue the row
  # from a padding slot.
  pad_after_real = ~mask[:, 1:] & np.logical_or.accumulate(mask, axis=1)[:, :-1]
  if pad_after_real.any():
    row, position = np.argwhere(pad_after_real)[0]
    raise ValueError(f'prompt row {row} has padding at position {position + 1} after a real '
                     'token: prompts are left padded (prompt_mask False, then True)')
  check = getattr(model, 'check_prompt', None)
  tokens = None if prompt_tokens is None else _on_host(prompt_tokens)
  if check is not None and tokens is not None:
    check(tokens, mask, context)


def _decode(first_logits, next_logits, model_state, *, rng, max_new_tokens, sampling,
            stop_tokens, pad_id, modalities, modal_state):
  """Samples up to `max_new_tokens`, feeding each token to `next_logits` to get the next.

  `next_logits(model_state, tokens [batch], step) -> (logits [batch, vocab], model_state)`
  gives the logits after the token emitted at `step - 1`. `modalities` (a
  `mixed_modal.ModalityRules` or None) restricts and draws each token from `modal_state`
  on (its state after the prompt); guided, the batch's second half (the unconditional rows)
  is fed the first half's tokens and not returned.
  """
  batch = first_logits.shape[0]

  def is_stop(tokens):
    return functools.reduce(jnp.logical_or, [tokens == stop for stop in stop_tokens],
                            jnp.zeros_like(tokens, bool))

  def emit(state, logits):
    step, _, tokens, lengths, done, modal_state, model_state = state
    step_rng = jax.random.fold_in(rng, step)
    if modalities is None:
      new = sample(logits, step_rng, sampling)
    else:
      new, modal_state = modalities.next_tokens(logits, modal_state, max_new_tokens - step,
                                                step_rng, sampling, sample)
    tokens = jax.lax.dynamic_update_slice_in_dim(
        tokens, jnp.where(done, pad_id, new)[:, None], step, axis=1)
    lengths = lengths + (~done).astype(jnp.int32)
    return step + 1, new, tokens, lengths, done | is_stop(new), modal_state, model_state

  def body(state):
    step, last, *_, model_state = state
    logits, model_state = next_logits(model_state, last, step)
    return emit(state[:-1] + (model_state,), logits)

  def not_finished(state):
    step, *_, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  state = (jnp.int32(0), jnp.zeros(batch, jnp.int32),
           jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros(batch, jnp.int32),
           jnp.zeros(batch, bool), modal_state, model_state)
  state = emit(state, first_logits)
  _, _, tokens, lengths, _, _, _ = jax.lax.while_loop(not_finished, body, state)
  if modalities is not None and modalities.guided:
    tokens, lengths = tokens[:batch // 2], lengths[:batch // 2]
  return dict(tokens=tokens, lengths=lengths)


def _apply(model, params, tokens, embeddings, context, **kwargs):
  """`model.decode`: (logits `[batch, length, vocab]`, new cache or None)."""
  return model.apply(params, tokens, embeddings=embeddings, context=context, method='decode',
                     **kwargs)


def _modal_state(modalities, prompt_tokens, prompt_mask):
  """`modalities`' state after the prompt (None without modalities)."""
  return None if modalities is None else modalities.read_prompt(prompt_tokens, prompt_mask)


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
    jax.jit, static_argnames=('model', 'max_new_tokens', 'sampling', 'stop_tokens', 'pad_id',
                              'modalities'))
def _generate_with_cache(params, prompt_tokens, prompt_embeddings, prompt_mask, context, rng, *,
                         model, max_new_tokens, sampling, stop_tokens, pad_id, modalities):
  batch, prompt_length = prompt_mask.shape
  prompt_tokens, prompt_embeddings = _zero_padding(prompt_tokens, prompt_embeddings, prompt_mask)
  kv_mask, positions = _slots(prompt_mask, max_new_tokens)
  cache = model.init_cache(batch, prompt_length + max_new_tokens)
  logits, cache = _apply(model, params, prompt_tokens, prompt_embeddings, context,
                         positions=positions[:, :prompt_length], kv_mask=kv_mask, cache=cache,
                         cache_index=0)

  def next_logits(cache, last_tokens, step):
    slot = prompt_length + step - 1
    logits, cache = _apply(model, params, last_tokens[:, None], None, context,
                           positions=jax.lax.dynamic_slice_in_dim(positions, slot, 1, axis=1),
                           kv_mask=kv_mask, cache=cache, cache_index=slot)
    return logits[:, 0], cache

  return _decode(logits[:, -1], next_logits, cache, rng=rng, max_new_tokens=max_new_tokens,
                 sampling=sampling, stop_tokens=stop_tokens, pad_id=pad_id,
                 modalities=modalities,
                 modal_state=_modal_state(modalities, prompt_tokens, prompt_mask))


@functools.partial(
    jax.jit, static_argnames=('model', 'max_new_tokens', 'sampling', 'stop_tokens', 'pad_id',
                              'modalities'))
def _generate_without_cache(params, prompt_tokens, prompt_embeddings, prompt_mask, context, rng,
                            *, model, max_new_tokens, sampling, stop_tokens, pad_id,
                            modalities):
  prompt_length = prompt_mask.shape[1]
  prompt_tokens, prompt_embeddings = _zero_padding(prompt_tokens, prompt_embeddings, prompt_mask)
  kv_mask, positions = _slots(prompt_mask, max_new_tokens)
  as_tokens = prompt_embeddings is None
  prompt = prompt_tokens if as_tokens else prompt_embeddings
  sequence = jnp.pad(prompt, [(0, 0), (0, max_new_tokens)] + [(0, 0)] * (prompt.ndim - 2))

  def logits_at(sequence, slot):
    tokens, embeddings = (sequence, None) if as_tokens else (None, sequence)
    logits, _ = _apply(model, params, tokens, embeddings, context, positions=positions,
                       kv_mask=kv_mask)
    return jax.lax.dynamic_index_in_dim(logits, slot, axis=1, keepdims=False)

  def next_logits(sequence, last_tokens, step):
    slot = prompt_length + step - 1
    new = last_tokens[:, None]
    if not as_tokens:
      new = model.apply(params, new, method='embed').astype(sequence.dtype)
    sequence = jax.lax.dynamic_update_slice_in_dim(sequence, new, slot, axis=1)
    return logits_at(sequence, slot), sequence

  return _decode(logits_at(sequence, prompt_length - 1), next_logits, sequence, rng=rng,
                 max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stop_tokens,
                 pad_id=pad_id, modalities=modalities,
                 modal_state=_modal_state(modalities, prompt_tokens, prompt_mask))


def _call(impl, model, params, prompt_tokens, prompt_embeddings, prompt_mask, context,
          max_new_tokens, rng, sampling, stop_tokens, pad_id, modalities):
  if modalities is not None:
    image_sampling = modalities.image_sampling or sampling
    if rng is None and not image_sampling.greedy:
      raise ValueError(f'image_sampling {image_sampling} draws at random: pass rng')
    if modalities.guided and prompt_mask.shape[0] % 2:
      raise ValueError(f'guidance_scale={modalities.guidance_scale} needs the conditional '
                       f'rows then as many unconditional ones; the batch has '
                       f'{prompt_mask.shape[0]} rows')
  rng = _check_inputs(prompt_tokens, prompt_embeddings, prompt_mask, max_new_tokens, rng,
                      sampling)
  _check_prompt(model, prompt_tokens, prompt_mask, context)
  return impl(sharding.strip_boxes(params), prompt_tokens, prompt_embeddings, prompt_mask,
              context, rng, model=model, max_new_tokens=int(max_new_tokens), sampling=sampling,
              stop_tokens=tuple(int(token) for token in stop_tokens), pad_id=int(pad_id),
              modalities=modalities)


def generate(model: Decoder, params, *, prompt_tokens=None, prompt_embeddings=None, prompt_mask,
             context=None, max_new_tokens: int, rng=None, sampling: Sampling = Sampling(),
             stop_tokens=(), pad_id: int = 0, modalities=None) -> dict[str, jax.Array]:
  """Continues left-padded prompts by up to `max_new_tokens` tokens, with a KV cache.

  Args:
    model: a `Decoder` (module docstring).
    params: its variables (`{'params': ...}`), boxed with logical axis names or not.
    prompt_tokens: `[batch, prompt]` int token ids, or
    prompt_embeddings: `[batch, prompt, width]` inputs to the decoder stack (e.g. text
      embeddings with image features spliced in); new tokens go in as token ids.
    prompt_mask: `[batch, prompt]` bool, True on real tokens; padding on the left only, and
      at least one real token per row.
    context: what the model reads besides the text, passed to every `decode` call (e.g. a
      Flamingo's media `[batch, images, latents, width]`, a LLaVA's image features `[batch,
      patches, width]`); None for a plain LM.
    max_new_tokens: how many tokens to sample per row at most.
    rng: key for sampling (unused when greedy).
    sampling: `Sampling` settings.
    stop_tokens: token ids that end a row; the stop token is part of the row's output.
    pad_id: written to the slots after a row has stopped.
    modalities: a `mixed_modal.ModalityRules` for a decoder writing text and image tokens
      (which token may come next, `sampling` for text and its `image_sampling` for codes,
      classifier-free guidance); None: any token, drawn with `sampling`.

  Returns:
    `tokens [batch, max_new_tokens]` int32 and `lengths [batch]` int32, the number of
    tokens each row emitted (stop token included); `tokens[i, lengths[i]:] == pad_id`.
    Guided (`modalities.guidance_scale != 1`), the conditional rows only: `batch / 2`.

  Raises:
    ValueError: bad arguments, or (prompts on this host, not traced) a prompt row that is
      empty, has padding after a real token, or that `model.check_prompt` refuses (e.g. a
      token id outside the vocabulary, more `<image>` tokens than a Flamingo's media hold);
      the message names the row.
  """
  return _call(_generate_with_cache, model, params, prompt_tokens, prompt_embeddings,
               prompt_mask, context, max_new_tokens, rng, sampling, stop_tokens, pad_id,
               modalities)


def generate_without_cache(model: Decoder, params, *, prompt_tokens=None, prompt_embeddings=None,
                           prompt_mask, context=None, max_new_tokens: int, rng=None,
                           sampling: Sampling = Sampling(), stop_tokens=(),
                           pad_id: int = 0, modalities=None) -> dict[str, jax.Array]:
  """`generate` without a cache: every step runs the model over the whole sequence (new
  tokens extend `prompt_embeddings` through `model.embed`)."""
  return _call(_generate_without_cache, model, params, prompt_tokens, prompt_embeddings,
               prompt_mask, context, max_new_tokens, rng, sampling, stop_tokens, pad_id,
               modalities)
