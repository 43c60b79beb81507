"""Tokenizers by name: the one registry (`TOKENIZERS`), e.g. `config.data.tokenizer`.

Every tokenizer class has `vocab_size` (a class attribute: known without building it, for
config checks), `pad_id`, `bos_id`, `eot_id`, `encode(texts, max_len) -> int32 [len(texts),
max_len]` (rows `[BOS, ids..., EOT, pad...]`, long texts cut with EOT kept last) and
`decode(ids) -> str` for one row.

  'byte':     `ByteTokenizer` (`byte`), UTF-8 bytes, vocabulary 259, needs no file.
  'clip_bpe': `ClipTokenizer` (`clip_bpe`), OpenAI CLIP's BPE, vocabulary 49408; building
              one reads the vocabulary file of the open-clip-torch wheel.
  'byte_lm':  `ByteLMTokenizer` (`byte`), the byte ids plus `<image>`, vocabulary 260, for
              decoder LMs that read images (`encode_text`, `image_id`, `eos_id` besides).
"""

from mmjax.data.tokenizers.byte import ByteLMTokenizer, ByteTokenizer
from mmjax.data.tokenizers.clip_bpe import ClipTokenizer

TOKENIZERS = {'byte': ByteTokenizer, 'clip_bpe': ClipTokenizer, 'byte_lm': ByteLMTokenizer}


def get(name: str):
  """Returns a new tokenizer for `name`, a key of TOKENIZERS; ValueError for any other name."""
  if name not in TOKENIZERS:
    raise ValueError(f'unknown tokenizer {name!r}; choices: {", ".join(TOKENIZERS)}')
  return TOKENIZERS[name]()
