"""Byte-level tokenizers: they need no vocabulary file and no download.

`ByteTokenizer` ids: 0 = padding, 1..256 = UTF-8 bytes (byte b -> b + 1), 257 = begin-of-text,
258 = end-of-text; text is lower-cased. The end-of-text id is the highest id, so CLIP-style
pooling at `argmax(token_ids)` finds it.

`ByteLMTokenizer` (decoder LMs that read images: LLaVA, Flamingo): the same ids plus
259 = `<image>`, the placeholder a model replaces by image features or reads images at; its
end-of-text is the LM's EOS (the end of chunk of interleaved rows).

`EarlyFusionTokenizer` (Chameleon): `ByteLMTokenizer`'s ids plus 260 = begin-image,
261 = end-image, and the VQ codes from 262 on (code k = 262 + k); an image in a row is
`[begin] <image>*N [end]`, the placeholders becoming the image's codes in the train step.
"""

import numpy as np

PAD_ID = 0
BYTE_OFFSET = 1
BOS_ID = 257
EOT_ID = 258
IMAGE_ID = 259


class ByteTokenizer:
  """Encodes text as `[BOS, bytes..., EOT, PAD...]` of a fixed length."""

  vocab_size = 259
  pad_id = PAD_ID
  bos_id = BOS_ID
  eot_id = EOT_ID

  def encode(self, texts, max_len: int) -> np.ndarray:
    """Returns int32 `[len(texts), max_len]`; long texts are cut, EOT is always kept."""
    if max_len < 3:
      raise ValueError(f'max_len must be at least 3 (BOS, one byte, EOT), got {max_len}')
    out = np.full((len(texts), max_len), PAD_ID, np.int32)
    for row, text in enumerate(texts):
      body = np.frombuffer(text.lower().encode('utf-8'), np.uint8)[:max_len - 2]
      ids = np.concatenate([[BOS_ID], body.astype(np.int32) + BYTE_OFFSET, [EOT_ID]])
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids) -> str:
    """Inverse of `encode` for one row (special ids are dropped)."""
    body = [int(i) - BYTE_OFFSET for i in ids if BYTE_OFFSET <= int(i) < BOS_ID]
    return bytes(body).decode('utf-8', errors='replace')


class ByteLMTokenizer(ByteTokenizer):
  """`ByteTokenizer` with an image placeholder id, for decoder LMs that read images."""

  vocab_size = 260
  image_id = IMAGE_ID
  eos_id = EOT_ID

  def encode_text(self, text: str) -> np.ndarray:
    """int32 [n]: the ids of the lower-cased UTF-8 bytes of `text`, no special ids."""
    return np.frombuffer(text.lower().encode('utf-8'), np.uint8).astype(np.int32) + BYTE_OFFSET

  def image_ids(self, num_image_tokens: int) -> np.ndarray:
    """int32 [N]: how an image of N tokens appears in a row: N `<image>` placeholders
    (none for N = 0, a row without an image)."""
    return np.full(num_image_tokens, self.image_id, np.int32)

  def decode(self, ids) -> str:
    """The text of `ids` up to the first EOS; pad, BOS and image ids are dropped."""
    ids = [int(i) for i in ids]
    if EOT_ID in ids:
      ids = ids[:ids.index(EOT_ID)]
    return super().decode(ids)


class EarlyFusionTokenizer(ByteLMTokenizer):
  """`ByteLMTokenizer` with begin/end-image markers and `num_codes` VQ code ids after them;
  `decode` drops markers and codes (the text of a row)."""

  begin_image_id = IMAGE_ID + 1
  end_image_id = IMAGE_ID + 2
  image_token_offset = IMAGE_ID + 3

  def __init__(self, num_codes: int):
    self.num_codes = num_codes
    self.vocab_size = self.image_token_offset + num_codes

  def image_ids(self, num_image_tokens: int) -> np.ndarray:
    """int32 [N + 2]: `[begin] <image>*N [end]` (none for N = 0)."""
    if not num_image_tokens:
      return np.zeros(0, np.int32)
    return np.concatenate([[self.begin_image_id], super().image_ids(num_image_tokens),
                           [self.end_image_id]]).astype(np.int32)
