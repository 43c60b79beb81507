"""Parity of `ClipTokenizer` with the reference CLIP tokenizer, and the tokenizer registry.

The reference is open_clip's `tokenizer.py` (a copy of OpenAI's `clip/simple_tokenizer.py`),
loaded by file path so that the `open_clip` package `__init__` (models, timm, ...) is not
imported. Where open_clip's defaults differ from OpenAI's (the special-token strings; see
the docstring of `mmjax.data.tokenizers.clip_bpe`), the expected ids are built from the
reference's ids for the pieces, following OpenAI's rules.
"""

import gzip
import importlib.util
import os
import random
import string

import emoji
import numpy as np
import pytest

from mmjax.data import tokenizers
from mmjax.data.tokenizers import ByteTokenizer, ClipTokenizer
from mmjax.data.tokenizers import clip_bpe as clip_tokenizer

pytest.importorskip('torch')  # the reference module imports torch at module level


@pytest.fixture(scope='module')
def ref():
  """open_clip's tokenizer module, loaded by file path."""
  spec = importlib.util.find_spec('open_clip')
  assert spec is not None, f'open_clip is missing: {clip_tokenizer.INSTALL_HINT}'
  path = os.path.join(spec.submodule_search_locations[0], 'tokenizer.py')
  module_spec = importlib.util.spec_from_file_location('_open_clip_reference_tokenizer', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def tok():
  return ClipTokenizer()


def _emoji_strings(rng):
  """Official emoji names (':red_heart:'), the same without colons, and emoji characters."""
  chars = sorted(emoji.EMOJI_DATA)
  picked = rng.sample(chars, 60)
  names = [emoji.EMOJI_DATA[c]['en'] for c in picked]
  return ([*names[:30], *(n.strip(':').replace('_', ' ') for n in names[30:]),
           *picked[:30], f'a photo of {picked[30]}{picked[31]} and {picked[32]}',
           '👩🏽‍💻', '🏳️‍🌈', '👍🏿👍', '❤️', '🇯🇵 flag', 'keycap 1️⃣'])


HAND_WRITTEN = [
    # empty, whitespace only, repeated and unusual whitespace
    '', ' ', '\t\n  \r\n', 'a  b', '  leading and trailing  ', 'tab\tand\nnewline',
    'non\u00a0breaking', 'ideographic\u3000space', 'line\u2028separator', 'a\x1cb\x1fc',
    'nul\x00char', 'zero\u200bwidth',
    # punctuation and contractions
    'Hello, World!', '...', '!?!?', '!!!', 'a--b', '(parens) [brackets] {braces}',
    string.punctuation, "don't we'll I'm they're you've he'd it's", "DON'T", 'rock’n’roll',
    'e-mail@example.com', 'https://example.com/a?b=c&d=e#f', '#hashtag @mention',
    'C++ / C# / F#', '$9.99 — 50% off!', '«quoted» „text“', '¿qué? ¡sí!',
    # numbers
    '12345', '3.14159', '1,000,000', '2nd 3rd 4th', '½ ¾', '٣٤٥', 'Ⅻ', 'x² + y³', '0',
    '2024-01-31T12:00:00Z', '007', '１２３ full width',
    # accents and other scripts
    'café naïve Crème Brûlée', 'e\u0301', 'ÉCOLE', 'İstanbul', 'straße', 'ﬁne ligature',
    'Ñandú', 'Ελληνικά', 'русский текст', 'עברית', 'العربية', 'हिन्दी', 'ไทย',
    '日本語のテキスト', '中文字符测试', '한국어 텍스트', 'カタカナ ひらがな',
    # html entities (unescaped twice) and mojibake that ftfy repairs
    '&amp;', '&lt;b&gt;bold&lt;/b&gt;', '&amp;amp;', '&amp;lt;', '&#39;quoted&#39;',
    '&nbsp;x&nbsp;', '&eacute;t&eacute;', '&#x1F600;', '&#128512;', 'AT&T', 'a &b; c',
    'cafÃ©', 'â€œquotesâ€\x9d', '<b>tags</b>', '</w> in text',
    # mixed case
    'HeLLo WoRLD', 'A PHOTO OF A DOG', 'camelCaseWord', 'iPhone XS', 'ΣΊΣΥΦΟΣ',
    # words that are long, repeated or unusual for BPE
    'a' * 50, 'ab' * 40, 'supercalifragilisticexpialidocious', 'pneumonoultramicroscopic',
    'aaaa bbbb aaaa', 'the the the the',
]


def _over_length(rng):
  """Texts of more than 77 tokens."""
  words = 'a photo of the big small red blue dog cat on in with and'.split()
  return [' '.join(rng.choice(words) for _ in range(n)) for n in (76, 77, 78, 100, 300)] + [
      ', '.join(['word'] * 60), 'x' * 500, '日本' * 80, '🐶' * 100, '1234567890' * 20]


def _random_mixes(rng, pool, n):
  """Texts made of 1..6 random fragments of `pool`, joined by random separators."""
  seps = [' ', '', '  ', '\n', ', ', '-', '&amp;']
  out = []
  for _ in range(n):
    parts = rng.sample(pool, rng.randint(1, 6))
    text = parts[0]
    for part in parts[1:]:
      text += rng.choice(seps) + part
    out.append(text if rng.random() < 0.5 else text.upper())
  return out


def _parity_texts():
  rng = random.Random(0)
  base = HAND_WRITTEN + _emoji_strings(rng)
  return base + _over_length(rng) + _random_mixes(rng, [t for t in base if t.strip()], 150)


PARITY_TEXTS = _parity_texts()


def test_enough_parity_texts():
  assert len(PARITY_TEXTS) >= 300


@pytest.mark.parametrize('max_len', [77, 16])
@pytest.mark.parity
def test_encode_matches_reference(tok, ref, max_len):
  got = tok.encode(PARITY_TEXTS, max_len)
  want = ref.tokenize(PARITY_TEXTS, context_length=max_len).numpy()
  assert got.dtype == np.int32 and got.shape == (len(PARITY_TEXTS), max_len)
  bad = [text for text, g, w in zip(PARITY_TEXTS, got, want) if not np.array_equal(g, w)]
  assert not bad, f'{len(bad)} texts differ, e.g. {bad[:5]!r}'


@pytest.mark.parity
def test_unbounded_ids_match_reference(tok, ref):
  reference = ref.SimpleTokenizer()
  assert reference.clean_fn is ref._clean_lower  # open_clip's default = OpenAI's cleaning
  for text in PARITY_TEXTS:
    assert tok.encode_ids(text) == reference.encode(text), repr(text)


def test_row_layout(tok):
  short, long_ = tok.encode(['a dog', 'dog ' * 100], 16)
  assert short[0] == tok.bos_id == 49406
  n = int(np.argmax(short))  # CLIP pools at the end-of-text token, the highest id
  assert short[n] == tok.eot_id == 49407 and n == 1 + len(tok.encode_ids('a dog'))
  assert (short[n + 1:] == tok.pad_id).all()
  assert long_[0] == tok.bos_id and long_[-1] == tok.eot_id
  assert (long_[1:-1] == tok.encode_ids('dog')[0]).all()
  assert tok.vocab_size == 49408 and tok.encode(['x'], 77).max() < tok.vocab_size


def test_single_string_and_errors(tok):
  np.testing.assert_array_equal(tok.encode('a cat', 8), tok.encode(['a cat'], 8))
  with pytest.raises(ValueError, match='max_len'):
    tok.encode(['a'], 1)
  with pytest.raises(ValueError, match='1-D'):
    tok.decode(tok.encode(['a', 'b'], 8))


@pytest.mark.parity
def test_special_token_strings_follow_openai(tok, ref):
  """OpenAI's tokenizer reads the literal `<|endoftext|>` as the special id; open_clip's
  reads `<end_of_text>` instead. Ours does what OpenAI's does."""
  reference = ref.SimpleTokenizer()
  pieces = lambda *words: sum((reference.encode(w) for w in words), [])
  assert tok.encode_ids('a <|endoftext|> b') == pieces('a') + [49407] + pieces('b')
  assert tok.encode_ids('<|STARTOFTEXT|>dog') == [49406] + pieces('dog')
  assert tok.encode_ids('<end_of_text>') == pieces('<', 'end', '_', 'of', '_', 'text', '>')
  assert reference.encode('<end_of_text>') == [49407]  # open_clip's own reading
  assert reference.encode('<|endoftext|>') != [49407]


@pytest.mark.parametrize('text', ['a photo of a dog', 'the quick brown fox jumps over the lazy dog',
                                  'hello world', 'two cats on a mat', 'x', ''])
def test_decode_round_trip(tok, text):
  for max_len in (77, 64):
    assert tok.decode(tok.encode([text], max_len)[0]) == text


@pytest.mark.parity
def test_decode_matches_reference_text(tok, ref):
  reference = ref.SimpleTokenizer()
  for text in PARITY_TEXTS[:100]:
    ids = reference.encode(text)
    assert tok.decode(ids) == reference.decode(ids).strip()
    row = tok.encode([text], 77)[0]  # SOT skipped; EOT ends the text, padding ignored
    assert tok.decode(row) == tok.decode(row[1:list(row).index(49407)])


def test_missing_vocab_says_how_to_get_it(tmp_path, monkeypatch):
  missing = str(tmp_path / 'nope.txt.gz')
  with pytest.raises(FileNotFoundError, match='pip install --no-deps open-clip-torch') as err:
    ClipTokenizer(missing)
  assert missing in str(err.value) and clip_tokenizer.VOCAB_ENV in str(err.value)

  monkeypatch.setenv(clip_tokenizer.VOCAB_ENV, missing)
  with pytest.raises(FileNotFoundError, match=clip_tokenizer.VOCAB_ENV):
    ClipTokenizer()

  monkeypatch.delenv(clip_tokenizer.VOCAB_ENV)
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError, match='not installed.*pip install --no-deps'):
    ClipTokenizer()


def test_vocab_from_env_and_bad_file(tmp_path, monkeypatch):
  path = clip_tokenizer.find_vocab()
  assert os.path.basename(path) == clip_tokenizer.VOCAB_FILENAME
  monkeypatch.setenv(clip_tokenizer.VOCAB_ENV, path)
  assert ClipTokenizer().vocab_path == path
  bad = tmp_path / 'bad.txt.gz'
  with gzip.open(bad, 'wt') as f:
    f.write('header\na b\n')
  with pytest.raises(ValueError, match='not a CLIP BPE vocabulary'):
    ClipTokenizer(bad)


def test_registry():
  assert isinstance(tokenizers.get('byte'), ByteTokenizer)
  assert isinstance(tokenizers.get('clip_bpe'), ClipTokenizer)
  with pytest.raises(ValueError, match="'nope'.*byte, clip_bpe"):
    tokenizers.get('nope')
