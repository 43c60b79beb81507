"""Mixed-modal decoding rules: which token may come next when one decoder writes text and images.

A row of a Chameleon-style vocabulary (`mmjax.models.chameleon`) is in one of two phases:

- text: any token but the image codes, the end-image marker and `banned_ids` (e.g. HF's
  `<image>` placeholder, padding); the begin-image marker only if the whole image still fits
  in the tokens left (`1 + image_length + 1`, begin and end markers included), so no image
  is ever cut off;
- image (after begin-image): exactly `image_length` code tokens, then end-image is forced,
  and the row is back in text.

Text tokens are drawn with `generate`'s `sampling`, image codes with `image_sampling`
(temperature, top-k, top-p per modality). Classifier-free guidance for images
(`guidance_scale` g != 1): the batch holds B conditional rows then their B unconditional
rows (the same layout, e.g. an empty prompt); for image codes the conditional rows' logits
become `u + g (c - u)` of the two halves' log-probabilities (Gafni et al. 2022, as Chameleon
samples images), text is drawn from the conditional rows alone, and the one token drawn
per pair goes to both rows, so the halves stay in step.

`generate.generate(..., modalities=ModalityRules(...))` applies them at every step with or
without a cache, starting from the state its prompt leaves (`read_prompt`: a prompt ending
in begin-image is continued by an image); `allowed` and `advance` are the rules themselves
(pure; tests/test_mixed_modal.py checks them against a numpy reference on random logits).
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ModalState(NamedTuple):
  """Per row: `in_image [batch]` bool, `codes_written [batch]` int32 (in the current image)."""
  in_image: jax.Array
  codes_written: jax.Array


@dataclasses.dataclass(frozen=True)
class ModalityRules:
  """The vocabulary layout and the per-modality sampling (module docstring).

  Fields: `image_token_offset`, `num_codes` (codes are ids `[offset, offset + num_codes)`),
  `begin_image_id`, `end_image_id`, `image_length` (codes per image, e.g. 64 for 8x8),
  `banned_ids` (never generated), `image_sampling` (a `generate.Sampling`; None: the text
  one), `guidance_scale` (1: no guidance; the batch is then not doubled).
  """
  image_token_offset: int
  num_codes: int
  begin_image_id: int
  end_image_id: int
  image_length: int
  banned_ids: tuple[int, ...] = ()
  image_sampling: object = None
  guidance_scale: float = 1.0

  def __post_init__(self):
    if self.image_length < 1 or self.num_codes < 1:
      raise ValueError(f'image_length={self.image_length} and num_codes={self.num_codes} '
                       'must be >= 1')
    codes = range(self.image_token_offset, self.image_token_offset + self.num_codes)
    for name in ('begin_image_id', 'end_image_id'):
      if getattr(self, name) in codes:
        raise ValueError(f'{name}={getattr(self, name)} is one of the image codes {codes}')

  @property
  def guided(self) -> bool:
    return self.guidance_scale != 1.0

  def init(self, batch: int) -> ModalState:
    """Every row in text."""
    return ModalState(jnp.zeros(batch, bool), jnp.zeros(batch, jnp.int32))

  def read_prompt(self, prompt_tokens, prompt_mask) -> ModalState:
    """The state after the real tokens (`prompt_mask` True) of `prompt_tokens [batch,
    prompt]`: a prompt ending in begin-image (text -> image) or inside an image continues
    the image. None (a prompt of embeddings): every row in text."""
    batch = prompt_mask.shape[0]
    if prompt_tokens is None:
      return self.init(batch)

    def read(state, column):
      tokens, real = column
      new = self.advance(state, tokens)
      return jax.tree.map(lambda n, o: jnp.where(real, n, o), new, state), None

    state, _ = jax.lax.scan(read, self.init(batch), (prompt_tokens.T, prompt_mask.T))
    return state

  def allowed(self, state: ModalState, tokens_left, vocab_size: int) -> jax.Array:
    """`[batch, vocab]` bool: the tokens each row may emit now; `tokens_left` (int scalar)
    counts this one."""
    ids = jnp.arange(vocab_size)
    is_code = (ids >= self.image_token_offset) & (ids < self.image_token_offset + self.num_codes)
    text = ~is_code & (ids != self.end_image_id)
    for banned in self.banned_ids:
      text &= ids != banned
    image_fits = tokens_left >= self.image_length + 2
    text &= (ids != self.begin_image_id) | image_fits
    image_done = state.codes_written >= self.image_length
    in_image = state.in_image[:, None]
    return jnp.where(in_image,
                     jnp.where(image_done[:, None], ids == self.end_image_id, is_code),
                     text)

  def advance(self, state: ModalState, tokens) -> ModalState:
    """The state after each row emitted `tokens [batch]`."""
    begins = ~state.in_image & (tokens == self.begin_image_id)
    ends = state.in_image & (tokens == self.end_image_id)
    in_image = (state.in_image | begins) & ~ends
    codes_written = jnp.where(in_image & ~begins, state.codes_written + 1, 0)
    return ModalState(in_image, codes_written.astype(jnp.int32))

  def next_tokens(self, logits, state: ModalState, tokens_left, rng, text_sampling, sample):
    """`logits [rows, vocab]` (rows = 2B when guided: conditional then unconditional) ->
    (tokens `[rows]` int32, the new state). `sample(logits, rng, sampling)` draws."""
    if self.guided:
      half = logits.shape[0] // 2
      conditional = jax.nn.log_softmax(logits[:half].astype(jnp.float32), axis=-1)
      unconditional = jax.nn.log_softmax(logits[half:].astype(jnp.float32), axis=-1)
      guided = unconditional + self.guidance_scale * (conditional - unconditional)
      state = jax.tree.map(lambda s: s[:half], state)
      text_logits, image_logits = conditional, guided
    else:
      text_logits = image_logits = logits.astype(jnp.float32)
    allowed = self.allowed(state, tokens_left, logits.shape[-1])
    mask = lambda x: jnp.where(allowed, x, -jnp.inf)
    text_rng, image_rng = jax.random.split(rng)
    image_sampling = self.image_sampling or text_sampling
    tokens = jnp.where(state.in_image, sample(mask(image_logits), image_rng, image_sampling),
                       sample(mask(text_logits), text_rng, text_sampling))
    state = self.advance(state, tokens)
    if self.guided:
      tokens = jnp.concatenate([tokens, tokens])
      state = jax.tree.map(lambda s: jnp.concatenate([s, s]), state)
    return tokens, state
