"""Byte-level tokenizers: they need no vocabulary file and no download.

`ByteTokenizer` ids: 0 = padding, 1..256 = UTF-8 bytes (byte b -> b + 1), 257 = begin-of-text,
258 = end-of-text; text is lower-cased. The end-of-text id is the highest id, so CLIP-style
pooling at `argmax(token_ids)` finds it.

`ByteLMTokenizer` (decoder LMs that read images: LLaVA, Flamingo): the same ids plus
259 = `<image>`, the placeholder a model replaces by image features or reads images at; its
end-of-text is the LM's EOS (the end of chunk of interleaved rows).
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

  def decode(self, ids) -> str:
    """The text of `ids` up to the first EOS; pad, BOS and image ids are dropped."""
    ids = [int(i) for i in ids]
    if EOT_ID in ids:
      ids = ids[:ids.index(EOT_ID)]
    return super().decode(ids)
