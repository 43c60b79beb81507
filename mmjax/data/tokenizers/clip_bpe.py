"""OpenAI CLIP's byte-level BPE tokenizer, with the ids of OpenAI's `clip.tokenize`.

The algorithm is that of `clip/simple_tokenizer.py` in github.com/openai/CLIP:

  1. clean: `ftfy.fix_text`, `html.unescape` twice, strip; every run of whitespace
     (the `regex` module's `\\s`) becomes one space; lower-case;
  2. split into words with CLIP's pattern (`'s|'t|'re|'ve|'m|'ll|'d`, runs of letters,
     single digits, runs of other non-space characters; the literal strings
     `<|startoftext|>` and `<|endoftext|>` are words of their own);
  3. map each word's UTF-8 bytes to printable characters (`bytes_to_unicode`), mark the
     last one with `</w>`, and apply the merges of `bpe_simple_vocab_16e6.txt.gz` (the
     first 49152 - 256 - 2 lines after its header), lowest rank first.

Ids: 0..255 the byte symbols, 256..511 the same with `</w>`, then one id per merge,
49406 = `<|startoftext|>`, 49407 = `<|endoftext|>`; the vocabulary has 49408 ids.
Padding is 0 (the byte symbol '!', as in OpenAI's zero-filled `clip.tokenize`), so
`decode` stops at the first end-of-text id instead of dropping zeros. The end-of-text id
is the highest id, so CLIP-style pooling at `argmax(token_ids)` finds it.

Parity with open_clip: open_clip 3.3.0 ships a copy of this tokenizer
(`open_clip/tokenizer.py`, `SimpleTokenizer`); its default `clean='lower'` is OpenAI's
cleaning, and its `__call__` truncates long texts the way `clip.tokenize(truncate=True)`
does. It differs from OpenAI's in two defaults, and this module follows OpenAI in both:

  * special-token strings: open_clip names them `<start_of_text>` / `<end_of_text>` (same
    ids 49406 / 49407), so the literal text `<|endoftext|>` is BPE-encoded there but is
    id 49407 in OpenAI's tokenizer and here (and `<end_of_text>` is the reverse);
  * whitespace cleaning: open_clip uses `str.split`, which also splits at U+001C..U+001F;
    OpenAI uses `regex` `\\s`, which does not. `ftfy.fix_text` deletes those control
    characters first, so the two agree on every input in practice.

OpenAI's `clip.tokenize` raises on over-long text unless `truncate=True`; `encode` here
always truncates, keeping end-of-text in the last position (open_clip's behaviour).

The vocabulary file ships inside the `open-clip-torch` wheel; it is found without
importing `open_clip` (whose `__init__` imports torch). Install it without its
dependencies (torch, torchvision, timm) with:

  python -m pip install --no-deps open-clip-torch==3.3.0
"""

import functools
import gzip
import html
import importlib.util
import os

import ftfy
import numpy as np
import regex

VOCAB_FILENAME = 'bpe_simple_vocab_16e6.txt.gz'
VOCAB_ENV = 'MMJAX_CLIP_VOCAB'  # environment variable: path of the vocabulary file
INSTALL_HINT = 'python -m pip install --no-deps open-clip-torch==3.3.0'

NUM_MERGES = 49152 - 256 - 2
SOT_TEXT = '<|startoftext|>'
EOT_TEXT = '<|endoftext|>'
PAD_ID = 0
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77  # the context length of every OpenAI CLIP model

END_OF_WORD = '</w>'
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
_WHITESPACE = regex.compile(r'\s+')


def bytes_to_unicode() -> dict[int, str]:
  """Maps each of the 256 byte values to a printable, non-whitespace character.

  Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order,
  to U+0100, U+0101, ... The order of this dict is the order of the first 256 ids.
  """
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  mapping = {b: chr(b) for b in printable}
  extra = (b for b in range(256) if b not in mapping)
  for n, b in enumerate(extra):
    mapping[b] = chr(256 + n)
  return mapping


def clean_text(text: str) -> str:
  """OpenAI CLIP's text cleaning: ftfy, html-unescape twice, collapse whitespace, lower-case."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return _WHITESPACE.sub(' ', text).strip().lower()


def find_vocab(path: str | os.PathLike | None = None) -> str:
  """Returns the path of `bpe_simple_vocab_16e6.txt.gz`.

  Looks at, in order: `path`, the environment variable `MMJAX_CLIP_VOCAB`, the folder of
  the installed `open_clip` package (found with `importlib.util.find_spec`, which does
  not import it). Raises FileNotFoundError, saying how to get the file, when the first
  of these that is given does not exist.
  """
  if path is not None:
    where = f'the path given ({os.fspath(path)!r})'
  elif os.environ.get(VOCAB_ENV):
    path = os.environ[VOCAB_ENV]
    where = f'${VOCAB_ENV} ({path!r})'
  else:
    spec = importlib.util.find_spec('open_clip')
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
      candidate = os.path.join(folder, VOCAB_FILENAME)
      if os.path.isfile(candidate):
        return candidate
    where = ('the installed open_clip package' if folders
             else 'open_clip, which is not installed')
    path = None
  if path is not None and os.path.isfile(path):
    return os.fspath(path)
  raise FileNotFoundError(
      f'CLIP BPE vocabulary {VOCAB_FILENAME} not found in {where}. It ships inside the '
      f'open-clip-torch wheel: install it without its dependencies with '
      f'`{INSTALL_HINT}`, or set ${VOCAB_ENV} to the path of the file.')


@functools.lru_cache(maxsize=4)
def _load_merges(path: str) -> tuple[tuple[str, str], ...]:
  """The first NUM_MERGES merge pairs of the vocabulary file (after its header line)."""
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    lines = f.read().split('\n')[1:NUM_MERGES + 1]
  merges = tuple(tuple(line.split()) for line in lines)
  if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f'{path} is not a CLIP BPE vocabulary: expected {NUM_MERGES} merge '
                     f'lines of two symbols after the header')
  return merges


class ClipTokenizer:
  """Encodes text as `[SOT, bpe ids..., EOT, 0...]` of a fixed length, as OpenAI CLIP does.

  Args:
    vocab_path: the `bpe_simple_vocab_16e6.txt.gz` file; default: see `find_vocab`.
    text_cache_size: how many distinct texts `encode` remembers (LRU); words are
      remembered without limit, as in OpenAI's tokenizer.
  """

  vocab_size = VOCAB_SIZE
  pad_id = PAD_ID
  bos_id = SOT_ID
  eot_id = EOT_ID

  def __init__(self, vocab_path: str | os.PathLike | None = None, *,
               text_cache_size: int = 1 << 16):
    self.vocab_path = find_vocab(vocab_path)
    merges = _load_merges(self.vocab_path)
    byte_symbols = list(bytes_to_unicode().values())
    symbols = [*byte_symbols, *(s + END_OF_WORD for s in byte_symbols),
               *(a + b for a, b in merges), SOT_TEXT, EOT_TEXT]
    # Built like OpenAI's: a symbol listed twice keeps its last id.
    self._encoder = {s: i for i, s in enumerate(symbols)}
    self._decoder = {i: s for s, i in self._encoder.items()}
    self._ranks = {pair: rank for rank, pair in enumerate(merges)}
    self._byte_encoder = bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    if len(self._encoder) != VOCAB_SIZE:
      raise ValueError(f'{self.vocab_path} gives {len(self._encoder)} ids, not {VOCAB_SIZE}')
    self._word_cache: dict[str, tuple[int, ...]] = {
        SOT_TEXT: (SOT_ID,), EOT_TEXT: (EOT_ID,)}
    self._encode_text = functools.lru_cache(maxsize=text_cache_size)(self._encode_text_uncached)

  def _bpe(self, symbols: list[str]) -> list[str]:
    """Merges adjacent symbols, the pair of lowest merge rank first, until none is ranked."""
    ranks = self._ranks
    while len(symbols) > 1:
      pairs = set(zip(symbols, symbols[1:]))
      best = min(pairs, key=lambda pair: ranks.get(pair, float('inf')))
      if best not in ranks:
        break
      first, second = best
      merged, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return symbols

  def _encode_word(self, word: str) -> tuple[int, ...]:
    """BPE ids of one word of the cleaned text (cached)."""
    ids = self._word_cache.get(word)
    if ids is None:
      chars = [self._byte_encoder[b] for b in word.encode('utf-8')]
      chars[-1] += END_OF_WORD
      ids = tuple(self._encoder[s] for s in self._bpe(chars))
      self._word_cache[word] = ids
    return ids

  def _encode_text_uncached(self, text: str) -> tuple[int, ...]:
    ids = []
    for word in WORD_PATTERN.findall(clean_text(text)):
      ids.extend(self._encode_word(word))
    return tuple(ids)

  def encode_ids(self, text: str) -> list[int]:
    """BPE ids of one text, without SOT/EOT and without a length limit."""
    return list(self._encode_text(text))

  def encode(self, texts, max_len: int = CONTEXT_LENGTH) -> np.ndarray:
    """Returns int32 `[len(texts), max_len]`: rows `[SOT, bpe ids..., EOT, 0...]`.

    `texts` is a sequence of str (a single str counts as one text). A text whose ids do
    not fit is cut to `max_len` with EOT in the last position, as
    `clip.tokenize(..., truncate=True)` does.
    """
    if isinstance(texts, str):
      texts = [texts]
    if max_len < 2:
      raise ValueError(f'max_len must be at least 2 (SOT and EOT), got {max_len}')
    out = np.full((len(texts), max_len), PAD_ID, np.int32)
    for row, text in enumerate(texts):
      body = self._encode_text(text)[:max_len - 2]
      out[row, 0] = SOT_ID
      out[row, 1:len(body) + 1] = body
      out[row, len(body) + 1] = EOT_ID
    return out

  def decode(self, ids) -> str:
    """Text of one row of ids (1-D): a leading SOT is skipped and the first EOT ends it.

    Decodes as OpenAI's `SimpleTokenizer.decode` (every `</w>` becomes a space), then
    strips the trailing space. `encode` cleans and lower-cases its input, so
    `decode(encode([t])[0])` gives back the cleaned, lower-cased text, up to the spaces
    around punctuation.
    """
    if np.ndim(ids) != 1:
      raise ValueError(f'decode takes one row of ids (1-D), got shape {np.shape(ids)}')
    ids = [int(i) for i in np.asarray(ids)]
    if ids and ids[0] == SOT_ID:
      ids = ids[1:]
    if EOT_ID in ids:
      ids = ids[:ids.index(EOT_ID)]
    symbols = ''.join(self._decoder[i] for i in ids)
    data = bytes(self._byte_decoder[c] for c in symbols)
    return data.decode('utf-8', errors='replace').replace(END_OF_WORD, ' ').strip()
