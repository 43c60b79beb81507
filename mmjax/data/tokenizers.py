"""Tokenizers by name.

Every tokenizer has `vocab_size`, `pad_id`, `bos_id`, `eot_id`,
`encode(texts, max_len) -> int32 [len(texts), max_len]` (rows `[BOS, ids..., EOT, pad...]`,
long texts cut with EOT kept last) and `decode(ids) -> str` for one row.

  'byte':     `ByteTokenizer`, UTF-8 bytes, vocabulary 259, needs no file.
  'clip_bpe': `ClipTokenizer`, OpenAI CLIP's BPE, vocabulary 49408; needs the
              vocabulary file of the open-clip-torch wheel (see `clip_tokenizer`).
"""

from mmjax.data.tokenizer import ByteTokenizer

CHOICES = ('byte', 'clip_bpe')
# Vocabulary sizes by name, known without building the tokenizer (for config checks).
VOCAB_SIZES = {'byte': 259, 'clip_bpe': 49408}


def get(name: str):
  """Returns a new tokenizer for `name`, one of CHOICES; ValueError for any other name."""
  if name == 'byte':
    return ByteTokenizer()
  if name == 'clip_bpe':
    from mmjax.data.clip_tokenizer import ClipTokenizer  # needs ftfy, regex, the vocabulary
    return ClipTokenizer()
  raise ValueError(f'unknown tokenizer {name!r}; choices: {", ".join(CHOICES)}')
