"""Mixed-modal generation (`mmjax.mixed_modal` in `mmjax.generate`'s loops): the rules against
a plain numpy reference on random logits, guided and not; sampled rows always parse as
text with whole images; cached == uncached on a Chameleon writing text and images.

The reference model is a table: the logits after a token at position p are
`step_logits[p] + token_logits[token]`, so they are random yet depend on what was drawn,
and the numpy loop can compute them without the model.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import generate
from mmjax.mixed_modal import ModalityRules
from mmjax.models.chameleon import Chameleon

VOCAB, TEXT = 30, 20  # ids 0..19 text (0 pad, 2 end-of-text), 20 begin, 21 end, 22..29 codes
PAD, EOS, BEGIN, END, OFFSET, CODES = 0, 2, 20, 21, 22, 8
IMAGE_LENGTH = 4
MAX_LEN = 64
RULES = ModalityRules(image_token_offset=OFFSET, num_codes=CODES, begin_image_id=BEGIN,
                      end_image_id=END, image_length=IMAGE_LENGTH, banned_ids=(PAD,))


class TableLM(nn.Module):
  """logits `[b, l, vocab]` = `step_logits[positions] + token_logits[tokens]`; a dummy cache."""

  def setup(self):
    init = nn.initializers.normal(3.0)
    self.step_logits = self.param('step_logits', init, (MAX_LEN, VOCAB))
    self.token_logits = self.param('token_logits', init, (VOCAB, VOCAB))

  def __call__(self, tokens):
    return self.token_logits[tokens]

  @nn.nowrap
  def init_cache(self, batch, max_len):
    return jnp.zeros(())

  def embed(self, tokens):
    return jax.nn.one_hot(tokens, VOCAB)

  def decode(self, tokens=None, *, embeddings=None, context=None, positions=None, kv_mask=None,
             cache=None, cache_index=None):
    del context, kv_mask, cache_index
    return self.step_logits[positions] + self.token_logits[tokens], cache


def table_params(seed, begin_bias=4.0):
  """Random tables; begin-image, end-image and the codes get a bias in every row so that the
  unconstrained argmax would often break the rules."""
  params = TableLM().init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))['params']
  bias = np.zeros(VOCAB, np.float32)
  bias[[BEGIN, END]] = begin_bias
  bias[OFFSET:] = 2.0
  return {'params': {'step_logits': np.asarray(params['step_logits']) + bias,
                     'token_logits': np.asarray(params['token_logits'])}}


def prompts(rng, lengths, last=None):
  """Left-padded random text prompts (ids 3..19), optionally ending in `last`."""
  ids = np.full((len(lengths), max(lengths)), PAD, np.int32)
  mask = np.zeros(ids.shape, bool)
  for row, length in enumerate(lengths):
    ids[row, -length:] = rng.integers(3, TEXT, length)
    if last is not None:
      ids[row, -1] = last
    mask[row, -length:] = True
  return ids, mask


def log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def reference(params, ids, mask, max_new, scale=1.0):
  """The rules written out in numpy, greedy; guided (scale != 1) pairs row i with row
  i + B. Returns `[B, max_new]` tokens, PAD after the end-of-text."""
  step_logits = params['params']['step_logits']
  token_logits = params['params']['token_logits']
  guided = scale != 1.0
  rows = len(ids) // 2 if guided else len(ids)
  out = np.full((rows, max_new), PAD, np.int32)
  for row in range(rows):
    members = [row, row + rows] if guided else [row]
    prompt = [list(ids[m][mask[m]]) for m in members]
    in_image, written = False, 0
    for token in prompt[0]:  # the conditional row's prompt decides the state
      if not in_image and token == BEGIN:
        in_image, written = True, 0
      elif in_image and token == END:
        in_image = False
      elif in_image:
        written += 1
    last = [p[-1] for p in prompt]
    position = [len(p) - 1 for p in prompt]
    for step in range(max_new):
      logits = [step_logits[position[k]] + token_logits[last[k]] for k in range(len(members))]
      if in_image:
        allowed = ({END} if written == IMAGE_LENGTH
                   else set(range(OFFSET, OFFSET + CODES)))
        scores = (log_softmax(logits[1]) + scale * (log_softmax(logits[0]) -
                                                    log_softmax(logits[1]))
                  if guided else logits[0])
      else:
        allowed = set(range(VOCAB)) - set(range(OFFSET, OFFSET + CODES)) - {END, PAD}
        if max_new - step < IMAGE_LENGTH + 2:
          allowed -= {BEGIN}
        scores = logits[0]
      token = max(allowed, key=lambda t: scores[t])
      out[row, step] = token
      if in_image and token == END:
        in_image = False
      elif in_image:
        written += 1
      elif token == BEGIN:
        in_image, written = True, 0
      if token == EOS:
        break
      last = [token] * len(members)
      position = [p + 1 for p in position]
  return out


def run(fn, params, ids, mask, max_new, rules=RULES, **kwargs):
  return fn(TableLM(), params, prompt_tokens=jnp.asarray(ids), prompt_mask=jnp.asarray(mask),
            max_new_tokens=max_new, stop_tokens=(EOS,), pad_id=PAD, modalities=rules, **kwargs)


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('fn', [generate.generate, generate.generate_without_cache])
def test_rules_equal_the_numpy_reference(seed, fn):
  rng = np.random.default_rng(seed)
  params = table_params(seed)
  ids, mask = prompts(rng, (5, 3, 7, 2))
  ids[1, -1] = BEGIN  # a prompt ending in begin-image is continued by an image
  max_new = 25
  want = reference(params, ids, mask, max_new)
  got = run(fn, params, ids, mask, max_new)
  np.testing.assert_array_equal(np.asarray(got['tokens']), want)
  # The case is not trivial: images were written, and the unconstrained argmax differs.
  assert (want == BEGIN).sum() >= 2 and (want[1, :IMAGE_LENGTH] >= OFFSET).all()
  free = run(fn, params, ids, mask, max_new, rules=None)
  assert (np.asarray(free['tokens']) != want).any()


@pytest.mark.parametrize('fn', [generate.generate, generate.generate_without_cache])
def test_guidance_equals_the_numpy_reference(fn):
  rng = np.random.default_rng(5)
  params = table_params(5, begin_bias=0.0)
  conditional, conditional_mask = prompts(rng, (6, 4, 5), last=BEGIN)
  unconditional, unconditional_mask = prompts(rng, (1, 1, 1), last=BEGIN)
  width = conditional.shape[1]
  unconditional = np.pad(unconditional, [(0, 0), (width - 1, 0)])
  unconditional_mask = np.pad(unconditional_mask, [(0, 0), (width - 1, 0)])
  ids = np.concatenate([conditional, unconditional])
  mask = np.concatenate([conditional_mask, unconditional_mask])
  rules = ModalityRules(**{**RULES.__dict__, 'guidance_scale': 3.0})
  want = reference(params, ids, mask, 12, scale=3.0)
  got = run(fn, params, ids, mask, 12, rules=rules)
  np.testing.assert_array_equal(np.asarray(got['tokens']), want)
  assert got['tokens'].shape == (3, 12)
  # Guidance changed some code: the conditional logits alone draw another image.
  plain = reference(params, ids[:3], mask[:3], 12)
  assert (plain[:, :IMAGE_LENGTH] != want[:, :IMAGE_LENGTH]).any()


def parse(row):
  """Checks a generated row against the grammar: text, whole images `BEGIN codes*4 END`,
  no code or END outside an image, nothing after EOS but padding. Returns the image count."""
  images, i, row = 0, 0, list(row)
  while i < len(row):
    token = row[i]
    if token == EOS:
      assert all(t == PAD for t in row[i + 1:]), row
      return images
    assert token != PAD and token != END and not OFFSET <= token < OFFSET + CODES, row
    if token == BEGIN:
      body = row[i + 1:i + 1 + IMAGE_LENGTH]
      assert len(body) == IMAGE_LENGTH and all(OFFSET <= t < OFFSET + CODES for t in body), row
      assert row[i + 1 + IMAGE_LENGTH] == END, row
      images += 1
      i += IMAGE_LENGTH + 2
    else:
      i += 1
  return images


def test_sampled_rows_parse_with_sampling_per_modality():
  """Temperature sampling (text: top-p 0.9, images: top-k 3) over 64 rows: every row parses,
  images occur, and image codes only come from each step's 3 most likely codes."""
  rng = np.random.default_rng(0)
  params = table_params(3)
  ids, mask = prompts(rng, [int(n) for n in rng.integers(1, 8, 64)])
  rules = ModalityRules(**{**RULES.__dict__,
                           'image_sampling': generate.Sampling(temperature=1.0, top_k=3)})
  got = run(generate.generate, params, ids, mask, 30, rules=rules, rng=jax.random.key(0),
            sampling=generate.Sampling(temperature=1.0, top_p=0.9))
  tokens = np.asarray(got['tokens'])
  assert sum(parse(row) for row in tokens) >= 20
  # The image phase's top-k: the codes' logits after the previous token at its position.
  step_logits = params['params']['step_logits']
  token_logits = params['params']['token_logits']
  for row in range(len(tokens)):
    previous, position = ids[row, -1], mask[row].sum() - 1
    for token in tokens[row]:
      if OFFSET <= token < OFFSET + CODES:
        codes = (step_logits[position] + token_logits[previous])[OFFSET:]
        assert token - OFFSET in np.argsort(-codes)[:3]
      if token == EOS:
        break
      previous, position = token, position + 1


def test_an_image_that_cannot_fit_is_never_begun():
  rng = np.random.default_rng(1)
  params = table_params(1, begin_bias=50.0)  # begin-image dominates every text step
  ids, mask = prompts(rng, (3, 3))
  tokens = np.asarray(run(generate.generate, params, ids, mask, IMAGE_LENGTH + 1)['tokens'])
  assert not (tokens == BEGIN).any()
  tokens = np.asarray(run(generate.generate, params, ids, mask, IMAGE_LENGTH + 2)['tokens'])
  assert (tokens[:, 0] == BEGIN).all() and (tokens[:, -1] == END).all()


def test_bad_rules_and_batches_are_named():
  with pytest.raises(ValueError, match='begin_image_id=23 is one of the image codes'):
    ModalityRules(image_token_offset=OFFSET, num_codes=CODES, begin_image_id=23,
                  end_image_id=END, image_length=IMAGE_LENGTH)
  rules = ModalityRules(**{**RULES.__dict__, 'guidance_scale': 2.0})
  ids, mask = prompts(np.random.default_rng(0), (2, 2, 2))
  with pytest.raises(ValueError, match='the batch has 3 rows'):
    run(generate.generate, table_params(0), ids, mask, 8, rules=rules)
  sampled = ModalityRules(**{**RULES.__dict__,
                             'image_sampling': generate.Sampling(temperature=1.0)})
  with pytest.raises(ValueError, match='draws at random: pass rng'):
    run(generate.generate, table_params(0), ids, mask, 8, rules=sampled)


def test_chameleon_cached_equals_uncached_with_text_and_images():
  """A tiny random Chameleon (no HF masking) prompted with begin-image: both loops write the
  same image, end it, and go on in text."""
  num_codes, text = 16, 24
  config = dict(
      language_model=dict(vocab_size=text + 2 + num_codes, width=32, depth=2, num_heads=4,
                          num_kv_heads=2, mlp_dim=64, qk_norm=True),
      vq=dict(base_channels=32, channel_multiplier=(1, 1, 2), num_res_blocks=1, resolution=16,
              latent_channels=32, num_codes=num_codes, code_dim=8, mid_attention=False),
      image_token_offset=text + 2, begin_image_id=text, end_image_id=text + 1)
  model = Chameleon(**config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rules = ModalityRules(image_token_offset=text + 2, num_codes=num_codes, begin_image_id=text,
                        end_image_id=text + 1, image_length=16, banned_ids=(PAD,))
  ids, mask = prompts(np.random.default_rng(0), (5, 3), last=text)
  kwargs = dict(prompt_tokens=jnp.asarray(ids), prompt_mask=jnp.asarray(mask),
                max_new_tokens=24, modalities=rules, pad_id=PAD)
  cached = np.asarray(generate.generate(model, params, **kwargs)['tokens'])
  uncached = np.asarray(generate.generate_without_cache(model, params, **kwargs)['tokens'])
  np.testing.assert_array_equal(cached, uncached)
  assert (cached[:, :16] >= text + 2).all() and (cached[:, 16] == text + 1).all()
  assert (cached[:, 17:] < text).all()
  assert len(np.unique(cached[:, :16])) > 3
