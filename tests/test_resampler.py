"""PerceiverResampler against transformers' Idefics2PerceiverResampler (tiny random models, via
`mmjax.convert.hf_idefics2`) and against a torch transcription of OpenFlamingo's resampler."""

import functools
import os

os.environ['HF_HUB_OFFLINE'] = '1'

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from mmjax.convert import hf_idefics2
from mmjax.models import resampler

_TINY_TOWERS = dict(
    vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, image_size=16, patch_size=8),
    text_config=dict(model_type='mistral', vocab_size=64, intermediate_size=48,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))

HF_CONFIGS = {
    # Grouped-query attention, head_dim != width / heads, padded context, 4D input; the full
    # Idefics2ForConditionalGeneration state dict (keys under `model.`).
    'gqa_padded': dict(width=32, model=transformers.Idefics2ForConditionalGeneration,
                       prefix='model.connector.perceiver_resampler.', images=2,
                       context_lengths=(7, 4, 1, 7),
                       perceiver=dict(resampler_n_latents=5, resampler_depth=2,
                                      resampler_n_heads=4, resampler_head_dim=6,
                                      num_key_value_heads=2, rms_norm_eps=1e-5)),
    # One key/value head per query head, no padding, 3D input, scan=False; Idefics2Model.
    'mha': dict(width=24, model=transformers.Idefics2Model,
                prefix='connector.perceiver_resampler.', images=None, context_lengths=(6, 6, 6),
                perceiver=dict(resampler_n_latents=3, resampler_depth=3, resampler_n_heads=3,
                               resampler_head_dim=8, num_key_value_heads=3, rms_norm_eps=1e-6)),
}


@functools.partial(jax.jit, static_argnums=0)
def _forward(module, params, features, feature_mask):
  return module.apply({'params': params}, features, feature_mask)


def _context(lengths, tokens, width, seed=0):
  """Random features `[len(lengths), tokens, width]`, mask: row i has `lengths[i]` real tokens."""
  rng = np.random.default_rng(seed)
  features = rng.normal(0, 1, (len(lengths), tokens, width)).astype(np.float32)
  return features, np.arange(tokens)[None, :] < np.asarray(lengths)[:, None]


@pytest.mark.parametrize('name', sorted(HF_CONFIGS))
@pytest.mark.parity
def test_idefics2_matches_hf_perceiver_resampler(name):
  spec = HF_CONFIGS[name]
  hf_config = transformers.Idefics2Config(
      vision_config=_TINY_TOWERS['vision_config'],
      text_config=dict(_TINY_TOWERS['text_config'], hidden_size=spec['width'],
                       rms_norm_eps=spec['perceiver']['rms_norm_eps']),
      perceiver_config=dict(spec['perceiver'], hidden_size=spec['width']),
      attn_implementation='eager')
  torch.manual_seed(0)
  hf_model = spec['model'](hf_config).eval()
  hf_resampler = hf_model.get_submodule(spec['prefix'].rstrip('.'))
  with torch.no_grad():  # every weight random, norm scales and the latents too
    for param_name, param in hf_resampler.named_parameters():
      param.normal_(1.0 if 'norm' in param_name else 0.0, 0.2 if 'norm' in param_name else 0.3)
  features, mask = _context(spec['context_lengths'], max(spec['context_lengths']), spec['width'])
  with torch.no_grad():
    want = hf_resampler(context=torch.from_numpy(features),
                        attention_mask=torch.from_numpy(mask).long()).numpy()

  config = hf_idefics2.config_from_hf(hf_model.config, scan=name == 'gqa_padded')
  params = hf_idefics2.params_from_hf(hf_model.state_dict(), config, prefix=spec['prefix'])
  if spec['images']:  # the same rows, as [batch, images, tokens, width]
    batch_shape = (-1, spec['images'])
    got = _forward(resampler.PerceiverResampler(**config), params,
                   features.reshape(*batch_shape, *features.shape[1:]),
                   mask.reshape(*batch_shape, mask.shape[-1]))
    got = np.asarray(got).reshape(want.shape)
  else:
    got = np.asarray(_forward(resampler.PerceiverResampler(**config), params, features, mask))
  assert want.shape == (len(spec['context_lengths']), spec['perceiver']['resampler_n_latents'],
                        spec['width'])
  assert np.abs(want).max() > 0.5  # the comparison is not between near-zero numbers
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_params_from_hf_names_missing_and_misshaped_tensors():
  config = dict(layout='idefics2', num_latents=2, depth=1, num_heads=2, head_dim=4,
                num_kv_heads=1, norm_eps=1e-6, scan=True)
  prefix = hf_idefics2.PREFIX
  width = 8
  shapes = {f'{prefix}latents': (2, width), f'{prefix}norm.weight': (width,)}
  block = f'{prefix}layers.0.'
  shapes.update({f'{block}{n}.weight': (width,) for n in
                 ('input_latents_norm', 'input_context_norm', 'post_attention_layernorm')})
  shapes.update({f'{block}self_attn.q_proj.weight': (8, width),
                 f'{block}self_attn.k_proj.weight': (4, width),
                 f'{block}self_attn.v_proj.weight': (4, width),
                 f'{block}self_attn.o_proj.weight': (width, 8),
                 f'{block}mlp.gate_proj.weight': (4 * width, width),
                 f'{block}mlp.up_proj.weight': (4 * width, width),
                 f'{block}mlp.down_proj.weight': (width, 4 * width),
                 'model.connector.modality_projection.up_proj.weight': (width, 3)})
  state_dict = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
  params = hf_idefics2.params_from_hf(state_dict, config)
  assert params['transformer']['blocks']['attn']['key']['kernel'].shape == (1, width, 1, 4)

  del state_dict[f'{block}mlp.up_proj.weight']
  state_dict[f'{block}self_attn.k_proj.weight'] = np.zeros((8, width), np.float32)
  with pytest.raises(ValueError) as error:
    hf_idefics2.params_from_hf(state_dict, config)
  assert f'HF key missing: {block}mlp.up_proj.weight' in str(error.value)
  assert f'HF key {block}self_attn.k_proj.weight has shape (8, {width})' in str(error.value)


def _random_params(module, features, seed=0):
  """Params of `module` drawn with numpy: kernels, biases N(0, 0.3), scales N(1, 0.2),
  latents and time embeddings N(0, 1)."""
  abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), features))['params']
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(abstract, sep='/')
  spread = lambda path: ((1.0, 0.2) if path.endswith('scale') else
                         (0.0, 1.0) if path in ('latents', 'time_embed') else (0.0, 0.3))
  return flax.traverse_util.unflatten_dict(
      {path: rng.normal(*spread(path), leaf.shape).astype(np.float32)
       for path, leaf in flat.items()}, sep='/')


def _openflamingo_reference(params, media, num_heads, depth):
  """OpenFlamingo helpers.py `PerceiverResampler.forward` on `media (b, T, v, D)` (one frame per
  image, `media_time_embs` = our `time_embed`), written out in torch, with our params."""
  t = lambda a: torch.from_numpy(np.asarray(a))
  layer_norm = lambda y, p: F.layer_norm(y, y.shape[-1:], t(p['scale']), t(p['bias']))
  x = t(media)
  b, num_media, _, dim = x.shape
  if 'time_embed' in params:
    x = x + t(params['time_embed'])[:num_media, None]
  latents = t(params['latents']).expand(b, num_media, -1, dim)
  split_heads = lambda y: y.reshape(*y.shape[:-1], num_heads, -1).permute(0, 3, 1, 2, 4)
  for i in range(depth):
    block = params['transformer'][f'block_{i}']
    attn = {n: t(block['attn'][n]['kernel']) for n in ('query', 'key', 'value', 'out')}
    x_normed = layer_norm(x, block['ln_features'])
    latents_normed = layer_norm(latents, block['ln_latents'])
    q = latents_normed @ attn['query'].flatten(1)
    kv_input = torch.cat((x_normed, latents_normed), dim=-2)
    k, v = kv_input @ attn['key'].flatten(1), kv_input @ attn['value'].flatten(1)
    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    q = q * q.shape[-1] ** -0.5
    sim = torch.einsum('... i d, ... j d -> ... i j', q, k)
    sim = sim - sim.amax(dim=-1, keepdim=True)
    out = torch.einsum('... i j, ... j d -> ... i d', sim.softmax(dim=-1), v)
    out = out.permute(0, 2, 3, 1, 4).flatten(3)
    latents = out @ attn['out'].flatten(0, 1) + latents
    mlp = block['mlp']
    h = F.gelu(layer_norm(latents, block['ln_mlp']) @ t(mlp['fc_in']['kernel']))
    latents = h @ t(mlp['fc_out']['kernel']) + latents
  return layer_norm(latents, params['ln_final']).numpy()


def _stack_blocks(params, depth):
  blocks = [params['transformer'][f'block_{i}'] for i in range(depth)]
  stacked = jax.tree.map(lambda *layers: np.stack(layers), *blocks)
  return dict(params, transformer={'blocks': stacked})


@pytest.mark.parity
def test_flamingo_matches_openflamingo_reference_scanned_or_not():
  depth, num_heads = 2, 3
  kwargs = dict(layout='flamingo', num_latents=4, depth=depth, num_heads=num_heads, head_dim=5,
                max_images=4)
  media = np.random.default_rng(1).normal(0, 1, (2, 3, 6, 16)).astype(np.float32)
  unscanned = resampler.PerceiverResampler(**kwargs, scan=False)
  params = _random_params(unscanned, media)
  want = _openflamingo_reference(params, media, num_heads, depth)

  got = np.asarray(_forward(unscanned, params, media, None))
  got_scanned = np.asarray(_forward(resampler.PerceiverResampler(**kwargs, scan=True),
                                    _stack_blocks(params, depth), media, None))
  assert want.shape == (2, 3, 4, 16)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got_scanned, got, atol=1e-6, rtol=0)

  # Padded tokens are ignored: changing them changes nothing, the output equals the unpadded one.
  mask = np.ones(media.shape[:3], bool)
  mask[:, :, 4:] = False
  padded = media.copy()
  padded[:, :, 4:] = 100.0
  got_padded = np.asarray(_forward(unscanned, params, padded, mask))
  np.testing.assert_allclose(got_padded, _openflamingo_reference(params, media[:, :, :4],
                                                                 num_heads, depth),
                             atol=1e-5, rtol=0)


def test_flamingo_has_no_biases_but_its_layer_norms():
  module = resampler.PerceiverResampler(layout='flamingo', num_latents=4, depth=2, num_heads=3,
                                        head_dim=5, scan=False)
  params = _random_params(module, np.zeros((1, 2, 6, 16), np.float32))
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  biases = [path for path in flat if path.endswith('bias')]
  assert biases and all(path.split('/')[-2].startswith('ln_') for path in biases)
  block = params['transformer']['block_0']
  assert block['attn']['query']['kernel'].shape == (16, 3, 5)
  assert block['attn']['key']['kernel'].shape == (16, 3, 5)  # num_kv_heads = num_heads
  assert block['mlp']['fc_in']['kernel'].shape == (16, 64)
  assert params['latents'].shape == (4, 16) and 'time_embed' not in params


def test_time_embeddings_tell_images_apart():
  module = resampler.PerceiverResampler(layout='idefics2', num_latents=3, depth=1, num_heads=2,
                                        head_dim=4, num_kv_heads=1, max_images=3)
  image = np.random.default_rng(2).normal(0, 1, (2, 1, 5, 8)).astype(np.float32)
  same_images = np.repeat(image, 3, axis=1)
  params = _random_params(module, same_images)
  got = np.asarray(_forward(module, params, same_images, None))
  assert got.shape == (2, 3, 3, 8)
  for first, second in ((0, 1), (1, 2), (0, 2)):
    assert np.abs(got[:, first] - got[:, second]).max() > 1e-2

  # Image t sees features + time_embed[t]: with those embeddings zeroed, images are equal.
  params['time_embed'] = np.zeros_like(params['time_embed'])
  got = np.asarray(_forward(module, params, same_images, None))
  np.testing.assert_allclose(got[:, 1], got[:, 0], atol=1e-6, rtol=0)
  np.testing.assert_allclose(got[:, 2], got[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize('layout', resampler.LAYOUTS)
def test_shapes(layout):
  module = resampler.PerceiverResampler(layout=layout, num_latents=7, depth=2, num_heads=4,
                                        head_dim=3, num_kv_heads=2, dtype=jnp.bfloat16)
  init = lambda features: module.init_with_output(jax.random.key(0), features)
  images = jax.ShapeDtypeStruct((2, 3, 11, 12), jnp.float32)
  out, variables = jax.eval_shape(init, images)
  assert (out.shape, out.dtype) == ((2, 3, 7, 12), jnp.bfloat16)
  one_image, _ = jax.eval_shape(init, jax.ShapeDtypeStruct((2, 11, 12), jnp.float32))
  assert one_image.shape == (2, 7, 12)
  params = nn.unbox(variables)['params']
  assert params['transformer']['blocks']['attn']['key']['kernel'].shape == (2, 12, 2, 3)
  assert params['latents'].dtype == jnp.float32
  with pytest.raises(ValueError, match='max_images is 2'):
    resampler.PerceiverResampler(max_images=2, depth=1).init(jax.random.key(0),
                                                             jnp.zeros((1, 3, 2, 8)))
