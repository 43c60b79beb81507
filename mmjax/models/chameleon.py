"""Chameleon: early fusion, text and VQ image tokens in one sequence of one decoder.

Chameleon Team, "Chameleon: Mixed-Modal Early-Fusion Foundation Models" (2024). An image
becomes the codes of the VQ tokenizer (`mmjax.models.vq.VQModel`, frozen), each code a token
of the one vocabulary; the decoder (`mmjax.models.decoder.DecoderLM` with QK-norm, and the
'swin' norm placement of Chameleon-34B) reads and writes both modalities.

Vocabulary layout (fields): text ids, then wherever the vocabulary puts them the markers
`begin_image_id` / `end_image_id` around an image, and the image codes at
`image_token_offset + code`, `code in [0, num_codes)`. Hugging Face's
`ChameleonImageVocabularyMapping` names the code tokens `IMGIMG<digits as A-J>Z`;
`mmjax.convert.hf_chameleon` reads that mapping (contiguous in the released vocabulary).

Images enter a sequence two ways:
- as token ids already (training rows, generated images): `image_token_offset + codes`;
- as `image_placeholder_id` tokens (HF's `<image>`, one per code, as `ChameleonProcessor`
  expands it) plus `images`: `image_token_ids(tokens, images)` puts the codes of image i's
  tokenization at the placeholders of row i, in order.

    model = Chameleon(language_model=dict(vocab_size=..., qk_norm=True, ...),
                      vq=dict(num_codes=512, ...), image_token_offset=..., ...)
    logits, _ = model.apply({'params': params}, tokens, images=images)  # [b, l, vocab]
    generate.generate(model, {'params': params}, prompt_tokens=tokens, ...)

Params: `lm` (DecoderLM), `tokenizer` (VQModel; no gradient reaches it through this model).
Chameleon is an `mmjax.generate` decoder (`init_cache`, `decode`, `embed`, `check_prompt`);
it reads no context: images are tokens of the prompt.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import layers
from mmjax.models.decoder import DecoderLM, check_prompt_tokens
from mmjax.models.vq import VQModel


def fill_placeholders(tokens, image_tokens, placeholder_id: int):
  """`tokens [batch, length]` with the k-th `placeholder_id` of row i replaced by
  `image_tokens[i, k]` (`[batch, n]` token ids; HF's processor puts n placeholders per image).

  Under jit the count is not checked: placeholders past the n-th take the last image token.
  """
  is_placeholder = tokens == placeholder_id
  index = jnp.clip(jnp.cumsum(is_placeholder, axis=1) - 1, 0, image_tokens.shape[1] - 1)
  return jnp.where(is_placeholder, jnp.take_along_axis(image_tokens, index, axis=1), tokens)


class Chameleon(nn.Module):
  """Token ids `[batch, length]` (and optionally images) -> next-token logits.

  Fields:
    language_model: `DecoderLM` kwargs (`vocab_size` covers text, markers and codes).
    vq: `VQModel` kwargs of the image tokenizer.
    image_token_offset: the token id of code 0.
    begin_image_id, end_image_id: the markers around an image's codes.
    image_placeholder_id: HF's `<image>` id, replaced by codes when images are passed;
      None when the vocabulary has none.
    mask_image_logits: give the code tokens a logit of float32's minimum, as HF's
      `ChameleonForConditionalGeneration` always does (its released weights generate no
      images); for parity only, as it makes text -> image generation impossible.
  """
  language_model: dict
  vq: dict
  image_token_offset: int
  begin_image_id: int
  end_image_id: int
  image_placeholder_id: int | None = None
  mask_image_logits: bool = False
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    layers.freeze_dict_fields(self, 'language_model', 'vq')
    super().__post_init__()

  @property
  def num_codes(self) -> int:
    return self.vq.get('num_codes', VQModel.num_codes)

  def setup(self):
    vocab_size = self.language_model['vocab_size']
    if self.image_token_offset < 0 or self.image_token_offset + self.num_codes > vocab_size:
      raise ValueError(f'image_token_offset={self.image_token_offset} + num_codes='
                       f'{self.num_codes} codes do not fit the vocabulary of {vocab_size}')
    self.lm = DecoderLM(**self.language_model, dtype=self.dtype)
    self.tokenizer = VQModel(**self.vq, dtype=self.dtype)

  def is_image_token(self, tokens):
    """`[...]` int -> `[...]` bool: True on code tokens (not on the markers)."""
    return (tokens >= self.image_token_offset) & (
        tokens < self.image_token_offset + self.num_codes)

  def image_tokens(self, images):
    """`[b, H, W, 3]` in [-1, 1] -> token ids `[b, h*w]` int32 of their codes (row-major
    over the latent grid); the tokenizer is frozen (no gradient)."""
    return jax.lax.stop_gradient(self.tokenizer.tokenize(images)) + self.image_token_offset

  def decode_images(self, tokens, grid: tuple[int, int] | None = None):
    """Code token ids `[b, h*w]` -> images `[b, H, W, 3]` (the VQ decoder); ids outside the
    codes are clipped into them (a caller checks `is_image_token` first)."""
    codes = jnp.clip(tokens - self.image_token_offset, 0, self.num_codes - 1)
    return self.tokenizer.detokenize(codes, grid)

  def image_token_ids(self, tokens, images):
    """`tokens [batch, length]` with `<image>` placeholders -> the same ids with the
    placeholders of row i replaced, in order, by the codes of `images [batch, H, W, 3]`
    (`fill_placeholders`)."""
    if self.image_placeholder_id is None:
      raise ValueError('image_placeholder_id is None: this vocabulary has no <image> '
                       'placeholder; pass the image codes as tokens')
    return fill_placeholders(tokens, self.image_tokens(images), self.image_placeholder_id)

  def initialize(self, tokens, images):
    """Runs every submodule once, for `init(..., method='initialize')`: the whole param tree,
    the VQ decoder included (what a trained tokenizer's checkpoint holds)."""
    logits, _ = self(tokens, images)
    return logits, self.decode_images(self.image_tokens(images))

  def embed(self, tokens):
    """`[batch, length]` int -> the LM's embeddings `[batch, length, width]`."""
    return self.lm.embed(tokens)

  def _logits(self, logits):
    if not self.mask_image_logits:
      return logits
    columns = self.is_image_token(jnp.arange(logits.shape[-1]))
    return jnp.where(columns, jnp.finfo(logits.dtype).min, logits)

  def __call__(self, tokens, images=None, *, positions=None, kv_mask=None, cache=None,
               cache_index=None):
    """(logits `[batch, length, vocab]` float32, new cache or None).

    `images [batch, H, W, 3]` fill the `<image>` placeholders (`image_token_ids`); without
    them `tokens` are read as they are. `positions`, `kv_mask`, `cache`, `cache_index` as
    in `DecoderLM`.
    """
    if images is not None:
      tokens = self.image_token_ids(tokens, images)
    logits, cache = self.lm(tokens, positions=positions, kv_mask=kv_mask, cache=cache,
                            cache_index=cache_index)
    return self._logits(logits), cache

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """`DecoderLM.init_cache`. Works on an unbound module."""
    return DecoderLM(**self.language_model, dtype=self.dtype, parent=None).init_cache(
        batch, max_len, dtype)

  def decode(self, tokens=None, *, embeddings=None, context=None, positions=None, kv_mask=None,
             cache=None, cache_index=None):
    """`mmjax.generate.Decoder.decode`: (logits `[b, l, vocab]` float32, new cache or None).
    Chameleon reads no `context` (images are prompt tokens; `image_token_ids` expands HF
    placeholders first)."""
    if context is not None:
      raise ValueError(f'Chameleon reads no context, got one of shape {context.shape}: pass '
                       'images as code tokens in the prompt')
    logits, cache = self.lm(tokens, embeddings=embeddings, positions=positions, kv_mask=kv_mask,
                            cache=cache, cache_index=cache_index)
    return self._logits(logits), cache

  @nn.nowrap
  def check_prompt(self, tokens, mask, context=None):
    """`mmjax.generate.Decoder.check_prompt` (host-side; works on an unbound module): every
    real token is in the vocabulary, and no `<image>` placeholder is left (expand them with
    `image_token_ids`), naming the row."""
    del context  # `decode` refuses one
    check_prompt_tokens(tokens, mask, self.language_model['vocab_size'])
    if self.image_placeholder_id is None:
      return
    left = (np.asarray(tokens) == self.image_placeholder_id) & np.asarray(mask, bool)
    if left.any():
      row, position = np.argwhere(left)[0]
      raise ValueError(f'prompt row {row}, position {position}: an <image> placeholder (id '
                       f'{self.image_placeholder_id}) is left; replace the placeholders by '
                       "the image's codes first (Chameleon.image_token_ids)")
