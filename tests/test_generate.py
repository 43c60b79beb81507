"""`mmjax.generate`: the KV-cache decode loop against recomputing the whole sequence, stop
tokens, the samplers' distributions, sharded against one device, greedy decoding against
Hugging Face `LlamaForCausalLM.generate` on left-padded prompts, and that it knows no model
family (the decoder protocol; Flamingo and LLaVA run it in their own tests).
"""

import ast
import functools
import inspect
import os

os.environ['HF_HUB_OFFLINE'] = '1'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from mmjax import generate as gen  # noqa: E402
from mmjax import sharding  # noqa: E402
from mmjax.convert import hf_llama  # noqa: E402
from mmjax.models.decoder import DecoderLM  # noqa: E402
from mmjax.models.llava import LLaVA  # noqa: E402

LM = DecoderLM(vocab_size=96, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
PROMPT_LENGTHS = np.array([7, 3, 7, 1])  # left padded to the longest
MAX_NEW = 12
SAMPLED = gen.Sampling(temperature=0.8, top_k=40, top_p=0.9)
RNG = jax.random.key(7)


@functools.cache
def prompts():
  """`(tokens [4, 7], mask [4, 7])`: random ids >= 3 (0-2 are pad/bos/eos), left padded."""
  width = PROMPT_LENGTHS.max()
  mask = np.arange(width)[None] >= (width - PROMPT_LENGTHS)[:, None]
  tokens = np.random.RandomState(0).randint(3, LM.vocab_size, mask.shape)
  return np.where(mask, tokens, 0).astype(np.int32), mask


@functools.cache
def boxed_params():
  """LM.init's boxed tree filled with normal(0, 0.3) (RMSNorm scales 1 + that): peaked logits.

  Drawn with numpy: compiling LM.init (truncated normals) costs more than all of generate.
  """
  shapes = jax.eval_shape(LM.init, jax.random.key(0), prompts()[0])
  rs = np.random.RandomState(0)

  def draw(path, leaf):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0  # RMSNorm scales
    return jnp.asarray(base + 0.3 * rs.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def params():
  return sharding.strip_boxes(boxed_params())


@functools.cache
def run(cached: bool, sampling: gen.Sampling, stop_tokens=(), pad_id=0):
  tokens, mask = prompts()
  fn = gen.generate if cached else gen.generate_without_cache
  out = fn(LM, params(), prompt_tokens=tokens, prompt_mask=mask, max_new_tokens=MAX_NEW, rng=RNG,
           sampling=sampling, stop_tokens=stop_tokens, pad_id=pad_id)
  return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize('sampling', [gen.Sampling(), SAMPLED], ids=['greedy', 'sampled'])
def test_cache_matches_recomputing_the_sequence(sampling):
  with_cache, without_cache = run(True, sampling), run(False, sampling)
  np.testing.assert_array_equal(with_cache['tokens'], without_cache['tokens'])
  np.testing.assert_array_equal(with_cache['lengths'], [MAX_NEW] * len(PROMPT_LENGTHS))
  np.testing.assert_array_equal(without_cache['lengths'], with_cache['lengths'])
  assert len(np.unique(with_cache['tokens'])) > MAX_NEW  # not a degenerate repeat


def test_sampled_differs_from_greedy_and_follows_rng():
  greedy, sampled = run(True, gen.Sampling())['tokens'], run(True, SAMPLED)['tokens']
  assert (greedy != sampled).mean() > 0.5
  tokens, mask = prompts()
  other_rng = gen.generate(LM, params(), prompt_tokens=tokens, prompt_mask=mask,
                           max_new_tokens=MAX_NEW, rng=jax.random.key(8), sampling=SAMPLED)
  assert (np.asarray(other_rng['tokens']) != sampled).mean() > 0.5


def test_prompt_embeddings_give_the_same_tokens():
  tokens, mask = prompts()
  embeddings = LM.apply(params(), tokens, method=LM.embed)
  out = gen.generate(LM, params(), prompt_embeddings=embeddings, prompt_mask=mask,
                     max_new_tokens=MAX_NEW, rng=RNG, sampling=SAMPLED)
  np.testing.assert_array_equal(out['tokens'], run(True, SAMPLED)['tokens'])


def test_left_padding_changes_no_token():
  tokens, mask = prompts()
  batched = run(True, gen.Sampling())['tokens']
  row = 3  # one real token after six pads
  alone = gen.generate(LM, params(), prompt_tokens=tokens[row:, -1:], prompt_mask=mask[row:, -1:],
                       max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(alone['tokens'][0], batched[row])
  out_of_range_pads = np.where(mask, tokens, LM.vocab_size + 5)  # would embed as NaN
  for fn in (gen.generate, gen.generate_without_cache):
    out = fn(LM, params(), prompt_tokens=out_of_range_pads, prompt_mask=mask,
             max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(out['tokens'], batched)


def test_stop_tokens_end_rows_and_the_loop():
  free = run(True, gen.Sampling())['tokens']
  stop_tokens = (int(free[0, 2]), int(free[1, 5]), int(free[2, 0]), int(free[3, 8]))
  pad_id = -1
  stopped = run(True, gen.Sampling(), stop_tokens, pad_id)
  for row, free_row in enumerate(free):
    first_stop = np.flatnonzero(np.isin(free_row, stop_tokens))[0]
    expected = np.where(np.arange(MAX_NEW) <= first_stop, free_row, pad_id)
    np.testing.assert_array_equal(stopped['tokens'][row], expected)
    assert stopped['lengths'][row] == first_stop + 1
  assert stopped['lengths'].max() < MAX_NEW  # every row stopped early


@pytest.mark.parametrize('sampling', [gen.Sampling(temperature=1.5, top_k=1),
                                      gen.Sampling(temperature=1.5, top_p=1e-6)],
                         ids=['top_k_1', 'tiny_top_p'])
def test_sampling_from_one_token_is_greedy(sampling):
  np.testing.assert_array_equal(run(True, sampling)['tokens'], run(True, gen.Sampling())['tokens'])


def allowed_probs(logits, sampling):
  """Reference: softmax(logits / T) restricted to the top-k, then to the nucleus."""
  probs = np.exp(logits / sampling.temperature - np.max(logits / sampling.temperature))
  probs /= probs.sum()
  order = np.argsort(-probs)
  keep = np.zeros(len(probs), bool)
  keep[order[:sampling.top_k or len(probs)]] = True
  probs = np.where(keep, probs, 0) / probs[keep].sum()
  mass = 0.0
  for token in np.argsort(-probs):  # add tokens until their mass reaches top_p
    if mass >= sampling.top_p:
      probs[token] = 0
    mass += probs[token]
  return probs / probs.sum()


@pytest.mark.parametrize('sampling', [
    gen.Sampling(temperature=1.0), gen.Sampling(temperature=0.5), gen.Sampling(temperature=2.0),
    gen.Sampling(temperature=1.0, top_k=3), gen.Sampling(temperature=0.7, top_p=0.8),
    gen.Sampling(temperature=1.3, top_k=4, top_p=0.6)])
def test_sampling_frequencies_follow_the_distribution(sampling):
  logits = np.array([2.0, 1.0, 0.5, 0.4, 0.0, -0.5, -1.0, -3.0], np.float32)
  draws = 40_000
  tokens = jax.jit(gen.sample, static_argnums=2)(
      jnp.broadcast_to(logits, (draws, len(logits))), jax.random.key(0), sampling)
  frequencies = np.bincount(np.asarray(tokens), minlength=len(logits)) / draws
  expected = allowed_probs(logits.astype(np.float64), sampling)
  assert np.all(frequencies[expected == 0] == 0)
  # 5 standard errors of a binomial frequency: a false alarm every ~10^6 checks.
  tolerance = 5 * np.sqrt(expected * (1 - expected) / draws) + 1e-9
  assert np.all(np.abs(frequencies - expected) <= tolerance), (frequencies, expected)


def test_sharded_matches_one_device():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  shardings = sharding.logical_shardings(boxed_params(), mesh)
  sharded_params = jax.device_put(sharding.strip_boxes(boxed_params()), shardings)
  assert not sharded_params['params']['lm_head']['kernel'].sharding.is_fully_replicated
  tokens, mask = jax.device_put(prompts(), sharding.batch_sharding(mesh))
  with sharding.activate(mesh):
    out = gen.generate(LM, sharded_params, prompt_tokens=tokens, prompt_mask=mask,
                       max_new_tokens=MAX_NEW, rng=RNG, sampling=SAMPLED)
  assert out['tokens'].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
  np.testing.assert_array_equal(out['tokens'], run(True, SAMPLED)['tokens'])
  np.testing.assert_array_equal(out['lengths'], run(True, SAMPLED)['lengths'])


@pytest.mark.parity
def test_greedy_matches_transformers_generate():
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
      pad_token_id=0, bos_token_id=1, eos_token_id=2)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.3 * torch.randn_like(param))
  config = hf_llama.config_from_hf(model.config)
  lm, lm_params = DecoderLM(**config), {'params': hf_llama.params_from_hf(model.state_dict(),
                                                                          config)}
  tokens, mask = prompts()
  with torch.no_grad():  # rows that emit eos (2) end there; HF pads them with pad_token_id
    hf_out = model.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                            do_sample=False, max_new_tokens=32)
  hf_tokens = hf_out[:, tokens.shape[1]:].numpy()
  ours = gen.generate(lm, lm_params, prompt_tokens=tokens, prompt_mask=mask, max_new_tokens=32,
                      stop_tokens=(hf_config.eos_token_id,), pad_id=hf_config.pad_token_id)
  np.testing.assert_array_equal(ours['tokens'][:, :hf_tokens.shape[1]], hf_tokens)
  np.testing.assert_array_equal(ours['tokens'][:, hf_tokens.shape[1]:], hf_config.pad_token_id)
  stopped = (hf_tokens == hf_config.eos_token_id).any(axis=1)
  assert 0 < stopped.sum() < len(stopped)  # some rows stopped, others ran all 32 tokens
  first_eos = np.argmax(hf_tokens == hf_config.eos_token_id, axis=1)
  np.testing.assert_array_equal(ours['lengths'], np.where(stopped, first_eos + 1, 32))


def test_generate_imports_no_model():
  """`generate` runs any `Decoder`: it imports no model module to branch on."""
  imported = set()
  for node in ast.walk(ast.parse(inspect.getsource(gen))):
    if isinstance(node, ast.Import):
      imported |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported |= {f'{node.module}.{alias.name}' for alias in node.names}
  assert 'mmjax.sharding' in imported  # the walk sees the imports
  assert not [name for name in imported if name.startswith('mmjax.models')], imported


def _spoilt(which, index, value):
  """`prompts()` copied, with `tokens[index]` or `mask[index]` (`which`) set to `value`."""
  tokens, mask = (np.array(x) for x in prompts())
  {'tokens': tokens, 'mask': mask}[which][index] = value
  return tokens, mask


# case: (which, index, value, the error). `prompts()` rows are 7, 3, 7, 1 tokens long.
INVALID_PROMPTS = {
    'right_padding': ('mask', (1, -1), False, r'prompt row 1 has padding at position 6 after '
                      r'a real token: prompts are left padded'),
    'inner_padding': ('mask', (0, 2), False,
                      r'prompt row 0 has padding at position 2 after a real token'),
    'empty_row': ('mask', 3, False, r'prompt row 3 is empty \(prompt_mask all False\)'),
    'id_past_vocab': ('tokens', (2, 5), LM.vocab_size, r'prompt row 2, position 5: token id '
                      r'96 is outside the vocabulary \[0, 96\)'),
    'negative_id': ('tokens', (3, 6), -1,
                    r'prompt row 3, position 6: token id -1 is outside the vocabulary'),
}


@pytest.mark.parametrize('case', sorted(INVALID_PROMPTS))
def test_invalid_prompts_are_refused_naming_the_row(case):
  """Checked on the host before anything compiles (padding ids are not read: see
  `test_left_padding_changes_no_token`)."""
  *edit, message = INVALID_PROMPTS[case]
  tokens, mask = _spoilt(*edit)
  for fn in (gen.generate, gen.generate_without_cache):
    with pytest.raises(ValueError, match=message):
      fn(LM, params(), prompt_tokens=tokens, prompt_mask=mask, max_new_tokens=MAX_NEW)
    with pytest.raises(ValueError, match=message):  # the same on device arrays
      fn(LM, params(), prompt_tokens=jnp.asarray(tokens), prompt_mask=jnp.asarray(mask),
         max_new_tokens=MAX_NEW)


def test_invalid_prompt_embeddings_masks_are_refused():
  embeddings = np.zeros(prompts()[0].shape + (LM.width,), np.float32)
  for case in ('right_padding', 'empty_row'):
    *edit, message = INVALID_PROMPTS[case]
    _, mask = _spoilt(*edit)
    with pytest.raises(ValueError, match=message):
      gen.generate(LM, params(), prompt_embeddings=embeddings, prompt_mask=mask,
                   max_new_tokens=MAX_NEW)


def test_llava_prompt_checks():
  """LLaVA's vocabulary, and no more image tokens in a row than its image features
  (`check_prompt` runs on the unbound module: nothing is initialised)."""
  llava = LLaVA(vision=dict(patch_size=4, width=16, depth=1, num_heads=2),
                language_model=dict(vocab_size=32, width=16, depth=1, num_heads=2,
                                    num_kv_heads=1, mlp_dim=32), image_token_id=31)
  tokens = np.array([[5, 31, 31, 6], [0, 31, 31, 31]], np.int32)
  mask = np.array([[True] * 4, [False, True, True, True]])
  features = jax.ShapeDtypeStruct((2, 2, 16), jnp.float32)  # 2 patches per image
  with pytest.raises(ValueError, match=r'prompt row 1 has 3 image tokens \(id 31\) but the '
                     r'image features \(context\) hold 2 patches'):
    gen.generate(llava, {}, prompt_tokens=tokens, prompt_mask=mask, context=features,
                 max_new_tokens=2)
  with pytest.raises(ValueError, match=r'prompt row 0, position 3: token id 32 is outside'):
    gen.generate(llava, {}, prompt_tokens=np.where(tokens == 6, 32, tokens), prompt_mask=mask,
                 context=features, max_new_tokens=2)
