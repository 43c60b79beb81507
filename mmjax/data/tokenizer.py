"""Byte-level tokenizer: needs no vocabulary file and no download.

Ids: 0 = padding, 1..256 = UTF-8 bytes (byte b -> b + 1), 257 = begin-of-text,
258 = end-of-text. The end-of-text id is the highest id, so CLIP-style pooling at
`argmax(token_ids)` finds it.
"""

import numpy as np

PAD_ID = 0
BYTE_OFFSET = 1
BOS_ID = 257
EOT_ID = 258
VOCAB_SIZE = 259


class ByteTokenizer:
  """Encodes text as `[BOS, bytes..., EOT, PAD...]` of a fixed length."""

  vocab_size = VOCAB_SIZE
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
