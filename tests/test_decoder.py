"""DecoderLM against Hugging Face LlamaForCausalLM (tiny random models), its KV cache,
the Llama converter, `lm_cross_entropy`, and the loss sharded over 8 devices."""

import functools
import os

os.environ['HF_HUB_OFFLINE'] = '1'

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax import losses
from mmjax import sharding
from mmjax.convert import hf_llama
from mmjax.models import decoder

HF_CONFIGS = {
    # Grouped-query attention, biased attention projections, untied lm_head.
    'gqa': dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                rope_parameters=dict(rope_type='default', rope_theta=10000.0),
                rms_norm_eps=1e-6, tie_word_embeddings=False),
    # One key/value head per query head, head_dim != width / heads, tied embeddings.
    'mha_tied': dict(vocab_size=80, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                     num_attention_heads=3, num_key_value_heads=3, head_dim=16,
                     rope_parameters=dict(rope_type='default', rope_theta=500.0),
                     rms_norm_eps=1e-5, tie_word_embeddings=True),
}


@pytest.fixture(scope='module', params=sorted(HF_CONFIGS))
def hf_model(request):
  """A tiny LlamaForCausalLM whose every weight (norms and biases too) is random."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(**HF_CONFIGS[request.param], attn_implementation='eager')
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      param.normal_(1.0 if 'norm' in name else 0.0, 0.2)
  return model


def _left_padded_batch(vocab_size, padding=(0, 3, 6), length=10, seed=0):
  """Tokens `[b, l]`, mask (row i starts with `padding[i]` padding tokens), HF position ids."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, (len(padding), length)).astype(np.int32)
  mask = np.arange(length)[None, :] >= np.asarray(padding)[:, None]
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
  return tokens, mask, positions


def _random_params(lm, seed=0):
  """Params of `lm` drawn with numpy (jitting `lm.init` would compile its random ops)."""
  abstract = jax.eval_shape(lm.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: rng.normal(0, 0.2, leaf.shape).astype(np.float32),
                      nn.unbox(abstract)['params'])


@functools.partial(jax.jit, static_argnums=0)
def _forward(lm, params, tokens, positions, kv_mask):
  return lm.apply({'params': params}, tokens, positions=positions, kv_mask=kv_mask)[0]


@pytest.mark.parametrize('scan', [True, False])
@pytest.mark.parity
def test_logits_match_hf_llama_with_left_padding(hf_model, scan):
  tokens, mask, positions = _left_padded_batch(hf_model.config.vocab_size)
  with torch.no_grad():
    want = hf_model(input_ids=torch.from_numpy(tokens).long(),
                    attention_mask=torch.from_numpy(mask).long(),
                    position_ids=torch.from_numpy(positions).long()).logits.numpy()
  config = hf_llama.config_from_hf(hf_model.config, scan=scan)
  params = hf_llama.params_from_hf(hf_model.state_dict(), config)
  got = _forward(decoder.DecoderLM(**config), params, tokens, positions, mask)
  assert np.abs(want[mask]).max() > 1.0  # the comparison is not between near-zero numbers
  np.testing.assert_allclose(np.asarray(got)[mask], want[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize('scan', [True, False])
def test_hf_round_trip_is_exact(hf_model, scan):
  state_dict = {key: value.numpy() for key, value in hf_model.state_dict().items()}
  config = hf_llama.config_from_hf(hf_model.config, scan=scan)
  params = hf_llama.params_from_hf(state_dict, config)
  exported = hf_llama.params_to_hf(params, config)
  assert exported.keys() == state_dict.keys()
  for key, value in state_dict.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  # Under another prefix (the LM inside LlavaForConditionalGeneration) the same params.
  llava_keys = {key.replace('model.', 'model.language_model.', 1): value
                for key, value in state_dict.items()}
  renamed = hf_llama.params_from_hf(llava_keys, config, hf_prefix='model.language_model.')
  jax.tree.map(np.testing.assert_array_equal, renamed, params)
  hf_model.load_state_dict({key: torch.from_numpy(value) for key, value in exported.items()},
                           strict=True)


def test_import_errors_name_the_tensors(hf_model):
  config = hf_llama.config_from_hf(hf_model.config)
  state_dict = {key: value.numpy() for key, value in hf_model.state_dict().items()}
  del state_dict['model.layers.1.mlp.up_proj.weight']
  kv_heads, width = config['num_kv_heads'], config['width']
  state_dict['model.layers.0.self_attn.k_proj.weight'] = np.zeros((kv_heads * 2, width))
  with pytest.raises(ValueError) as error:
    hf_llama.params_from_hf(state_dict, config)
  assert 'HF key missing: model.layers.1.mlp.up_proj.weight' in str(error.value)
  assert (f'HF key model.layers.0.self_attn.k_proj.weight has shape {(kv_heads * 2, width)}, '
          f'which gives decoder/blocks/attn/key/kernel [layer 0] shape {(width, kv_heads, 2)}; '
          f'the model wants {(width, kv_heads, config["head_dim"])}') in str(error.value)


def test_unsupported_hf_config_is_named():
  config = transformers.LlamaConfig(**dict(HF_CONFIGS['gqa'], hidden_act='gelu', mlp_bias=True))
  with pytest.raises(ValueError, match=r"hidden_act='gelu'[\s\S]*mlp_bias=True"):
    hf_llama.config_from_hf(config)


@pytest.mark.parametrize('scan', [True, False])
def test_kv_cache_decoding_matches_full_forward(scan):
  lm = decoder.DecoderLM(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2,
                         mlp_dim=48, rope_theta=100.0, scan=scan)
  tokens, mask, positions = _left_padded_batch(lm.vocab_size, padding=(0, 2, 5), length=9,
                                               seed=1)
  params = _random_params(lm)
  full = np.asarray(_forward(lm, params, tokens, positions, mask))

  @jax.jit
  def step(params, tokens, positions, cache, cache_index):
    return lm.apply({'params': params}, tokens, positions=positions, kv_mask=mask, cache=cache,
                    cache_index=cache_index)

  prompt = 4
  logits, cache = step(params, tokens[:, :prompt], positions[:, :prompt],
                       lm.init_cache(tokens.shape[0], tokens.shape[1]), 0)
  decoded = [logits]
  for slot in range(prompt, tokens.shape[1]):
    logits, cache = step(params, tokens[:, slot:slot + 1], positions[:, slot:slot + 1], cache,
                         jnp.int32(slot))
    decoded.append(logits)
  assert cache['key'].shape == (lm.depth, 3, tokens.shape[1], lm.num_kv_heads, 8)
  np.testing.assert_allclose(np.concatenate(decoded, axis=1)[mask], full[mask], atol=1e-5,
                             rtol=0)


def test_embed_then_embeddings_equals_tokens():
  lm = decoder.DecoderLM(vocab_size=64, width=16, depth=1, num_heads=2, num_kv_heads=1,
                         mlp_dim=24, tie_embeddings=True)
  tokens = np.random.default_rng(2).integers(0, 64, (2, 5))
  variables = {'params': _random_params(lm)}

  @jax.jit
  def embed_and_run(variables, tokens):
    embeddings = lm.apply(variables, tokens, method='embed')
    return (embeddings, lm.apply(variables, embeddings=embeddings)[0],
            lm.apply(variables, tokens)[0])

  embeddings, from_embeddings, from_tokens = embed_and_run(variables, tokens)
  np.testing.assert_array_equal(embeddings, variables['params']['token_embed'][tokens])
  np.testing.assert_array_equal(from_embeddings, from_tokens)


def _cross_entropy_reference(logits, targets, weights, z_loss):
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  log_z = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
  nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  weights = weights.astype(np.float64)
  cross_entropy = (weights * nll).sum() / weights.sum()
  loss = cross_entropy + z_loss * (weights * log_z ** 2).sum() / weights.sum()
  accuracy = (weights * (logits.argmax(-1) == targets)).sum() / weights.sum()
  return loss, cross_entropy, accuracy


@pytest.mark.parametrize('weight_kind', ['bool', 'float'])
@pytest.mark.parametrize('z_loss', [0.0, 1e-2])
def test_lm_cross_entropy_matches_numpy(weight_kind, z_loss):
  rng = np.random.default_rng(3)
  logits = (rng.normal(size=(3, 7, 11)) * 4 + 2).astype(np.float32)
  targets = rng.integers(0, 11, (3, 7)).astype(np.int32)
  targets[0, :3] = logits[0, :3].argmax(-1)  # some correct predictions
  weights = rng.random((3, 7)) > 0.3 if weight_kind == 'bool' else rng.random((3, 7))
  weights[2] = 0  # a row that is all padding
  loss, metrics = losses.lm_cross_entropy(logits, targets, weights, z_loss)
  want_loss, want_cross_entropy, want_accuracy = _cross_entropy_reference(
      logits, targets, weights, z_loss)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['cross_entropy'], want_cross_entropy, rtol=1e-5)
  np.testing.assert_allclose(metrics['z_loss'], want_loss - want_cross_entropy, rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(metrics['token_accuracy'], want_accuracy, rtol=1e-6)
  np.testing.assert_allclose(metrics['num_tokens'], weights.sum(), rtol=1e-6)
  assert 0 < want_accuracy < 1


def test_lm_cross_entropy_without_tokens_is_zero():
  loss_fn = lambda logits: losses.lm_cross_entropy(logits, jnp.zeros((2, 3), int),
                                                   jnp.zeros((2, 3)), z_loss=1e-4)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jnp.ones((2, 3, 5)))
  assert float(loss) == 0 and all(float(value) == 0 for value in metrics.values())
  assert not np.any(grads)


def _sharded_loss(mesh):
  lm = decoder.DecoderLM(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2,
                         mlp_dim=48, tie_embeddings=False, remat='full')
  tokens, mask, positions = _left_padded_batch(lm.vocab_size, padding=(0, 3, 6, 1, 0, 2, 5, 4),
                                               length=8, seed=4)
  abstract = jax.eval_shape(lm.init, jax.random.key(0), tokens)
  param_shardings = sharding.logical_shardings(abstract, mesh)['params']

  def loss_fn(params, tokens, positions, mask):
    logits, _ = lm.apply({'params': params}, tokens[:, :-1], positions=positions[:, :-1],
                         kv_mask=mask[:, :-1])
    return losses.lm_cross_entropy(logits, tokens[:, 1:], mask[:, 1:], z_loss=1e-3)[0]

  params = jax.device_put(_random_params(lm), param_shardings)
  batch = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (tokens, positions, mask)]
  with sharding.activate(mesh):
    loss = jax.jit(loss_fn)(params, *batch)
  return float(loss), params


def test_sharded_loss_matches_one_device():
  one_device, _ = _sharded_loss(sharding.make_mesh(dict(data=1), jax.devices()[:1]))
  sharded, params = _sharded_loss(sharding.make_mesh(dict(data=2, fsdp=2, tensor=2)))
  query = params['decoder']['blocks']['attn']['query']['kernel']
  assert query.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  assert query.addressable_shards[0].data.shape == (2, 16, 2, 8)
  np.testing.assert_allclose(sharded, one_device, rtol=1e-5)


def test_sown_max_attention_logit_matches_numpy():
  """Attention sows the largest pre-softmax logit over the keys each query may see (GQA,
  QK-norm, causal, left padding); with the collection immutable, or in init, nothing."""
  from mmjax.models import layers
  attention = layers.Attention(num_heads=4, num_kv_heads=2, causal=True, qk_norm=True)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 16)).astype(np.float32)
  kv_mask = np.ones((2, 5), bool)
  kv_mask[1, :2] = False  # the second row is left padded
  abstract = jax.eval_shape(attention.init, jax.random.key(0), x)
  params = jax.tree.map(lambda leaf: rng.normal(0.5, 0.5, leaf.shape).astype(np.float32),
                        nn.unbox(abstract)['params'])
  _, sown = attention.apply({'params': params}, x, kv_mask=kv_mask,
                            mutable=[layers.DIAGNOSTICS])
  got = np.asarray(sown[layers.DIAGNOSTICS]['max_attention_logit'][0])

  def head_norm(h, norm):
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) / np.sqrt(var + 1e-5) * norm['scale'] + norm['bias']

  project = lambda p: np.einsum('blw,whd->blhd', x, p['kernel']) + p['bias']
  q = head_norm(project(params['query']), params['query_norm'])
  k = head_norm(project(params['key']), params['key_norm'])
  k = np.repeat(k, 2, axis=2)  # query head h reads key head h // 2
  logits = np.einsum('bqhd,bshd->bhqs', q, k) / np.sqrt(4)
  sees = np.tril(np.ones((5, 5), bool))[None, None] & kv_mask[:, None, None, :]
  want = np.where(sees, logits, -np.inf).max(axis=(1, 2, 3))
  assert np.abs(want).min() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-5)
  _, nothing = attention.apply({'params': params}, x, kv_mask=kv_mask, mutable=['other'])
  assert not nothing
  assert set(jax.eval_shape(attention.init, jax.random.key(0), x)) == {'params'}
