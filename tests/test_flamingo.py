"""Flamingo: gates at 0 give the LM exactly, the media mask, exact zeros before the first
image, gradients into the gated blocks, the `lm` param tree in both decoder layouts,
generation with a KV cache, and the assembled model (vision tower, resampler, projection):
its per-part init and its logits and generations against the gated LM on its media."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import generate as gen
from mmjax import train
from mmjax.models import flamingo
from mmjax.models import layers
from mmjax.models.decoder import DecoderLM
from mmjax.models.resampler import PerceiverResampler
from mmjax.models.vit import ViT

IMAGE = 63
LM = dict(vocab_size=64, width=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=48)
XATTN = dict(xattn_heads=2, xattn_head_dim=8)
LENGTH, IMAGES, LATENTS, MEDIA_WIDTH = 12, 2, 3, 24
IMAGE_AT = ((3, 7), (0, 9))  # per row: positions of the `<image>` tokens


def _tokens():
  tokens = np.random.default_rng(0).integers(0, IMAGE, (len(IMAGE_AT), LENGTH))
  for row, positions in enumerate(IMAGE_AT):
    tokens[row, list(positions)] = IMAGE
  return jnp.asarray(tokens, jnp.int32)


def _media(seed, images=IMAGES):
  shape = (len(IMAGE_AT), images, LATENTS, MEDIA_WIDTH)
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _model(**kwargs):
  return flamingo.FlamingoLM(dict(LM, **kwargs.pop('lm', {})), IMAGE, cross_attn_every=2,
                             **XATTN, **kwargs)


def _logits(params, tokens, media, only_attend_immediate_media=True, lm_scan=True):
  model = _model(only_attend_immediate_media=only_attend_immediate_media,
                 lm=dict(scan=lm_scan))
  return model.apply({'params': params}, tokens, media)


@functools.cache
def _forward(**kwargs):
  return jax.jit(functools.partial(_logits, **kwargs))


@functools.cache
def _initial_params():
  variables = jax.jit(_model().init)(jax.random.key(0), _tokens(), _media(0))
  return nn.unbox(variables)['params']


def _randomized(params, gate, seed=1):
  """`params` with every leaf redrawn (norm scales around 1) and the gates set to `gate`."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'gate' in name:
      return jnp.full(leaf.shape, gate, jnp.float32)
    return jnp.asarray(rng.normal(1.0 if 'scale' in name else 0.0, 0.2, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, params)


def _open_gates(params, gate=0.5):
  return dict(params, gated_xattn=_randomized(params['gated_xattn'], gate))


def test_at_init_the_model_is_the_language_model_exactly():
  params = _initial_params()
  gates = [params['gated_xattn']['attn_gate'], params['gated_xattn']['ff_gate']]
  np.testing.assert_array_equal(np.stack(gates), np.zeros((2, LM['depth'] // 2)))
  lm = DecoderLM(**LM)
  lm_tree = nn.unbox(jax.eval_shape(lm.init, jax.random.key(0), _tokens()))['params']
  assert jax.tree.map(np.shape, lm_tree) == jax.tree.map(np.shape, params['lm'])
  want = jax.jit(lambda p, t: lm.apply({'params': p}, t)[0])(params['lm'], _tokens())
  for seed in (0, 1):
    np.testing.assert_array_equal(_forward()(params, _tokens(), _media(seed)), want)


def test_an_image_reaches_only_the_tokens_from_its_image_token_on():
  params = _open_gates(_initial_params())
  media = _media(0)
  base = np.asarray(_forward()(params, _tokens(), media))
  for image in range(IMAGES):
    changed = np.asarray(_forward()(params, _tokens(), media.at[:, image].set(_media(2)[:, 0])))
    for row, image_at in enumerate(IMAGE_AT):
      first = image_at[image]
      np.testing.assert_array_equal(changed[row, :first], base[row, :first])
      assert np.all(np.abs(changed[row, first:] - base[row, first:]).max(-1) > 1e-5)


@pytest.mark.parametrize('only_attend_immediate_media', [True, False])
def test_gated_block_media_mask(only_attend_immediate_media):
  """Changing image k changes exactly the tokens from its `<image>` token to the next one
  (immediate), or to the end (all previous images); tokens before it never change."""
  block = flamingo.GatedCrossAttentionBlock(num_heads=2, head_dim=8)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(len(IMAGE_AT), LENGTH, LM['width'])),
                  jnp.float32)
  mask = flamingo.text_to_media_mask(_tokens(), IMAGE, IMAGES, LATENTS,
                                     only_attend_immediate_media)
  flat = lambda media: media.reshape(len(IMAGE_AT), IMAGES * LATENTS, MEDIA_WIDTH)
  params = jax.eval_shape(block.init, jax.random.key(0), x, flat(_media(0)), mask)
  params = _randomized(nn.unbox(params)['params'], gate=0.5)
  apply = jax.jit(lambda media: block.apply({'params': params}, x, flat(media), mask))
  base = np.asarray(apply(_media(0)))
  for image in range(IMAGES):
    changed = np.asarray(apply(_media(0).at[:, image].set(_media(2)[:, 0])))
    for row, image_at in enumerate(IMAGE_AT):
      sees_image = np.zeros(LENGTH, bool)
      last = image_at[image + 1] if only_attend_immediate_media and image + 1 < IMAGES else None
      sees_image[image_at[image]:last] = True
      np.testing.assert_array_equal(np.any(changed[row] != base[row], axis=-1), sees_image)


def test_cross_attention_is_exactly_zero_before_the_first_image():
  attention = flamingo.MaskedCrossAttention(num_heads=2, head_dim=8)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(len(IMAGE_AT), LENGTH, LM['width'])),
                  jnp.float32)
  media = _media(0).reshape(len(IMAGE_AT), IMAGES * LATENTS, MEDIA_WIDTH)
  mask = flamingo.text_to_media_mask(_tokens(), IMAGE, IMAGES, LATENTS)
  params = jax.eval_shape(attention.init, jax.random.key(0), x, media, mask)
  params = _randomized(nn.unbox(params)['params'], gate=None)
  out = np.asarray(jax.jit(attention.apply)({'params': params}, x, media, mask))
  for row, image_at in enumerate(IMAGE_AT):
    np.testing.assert_array_equal(out[row, :image_at[0]], 0.0)
    assert np.all(np.abs(out[row, image_at[0]:]).max(-1) > 1e-3)


def test_gradients_open_the_gates_and_train_only_the_gated_blocks():
  cotangent = jnp.asarray(np.random.default_rng(5).normal(size=(len(IMAGE_AT), LENGTH,
                                                                 LM['vocab_size'])), jnp.float32)

  @jax.jit
  def gated_grads(params):
    loss = lambda gated: jnp.sum(cotangent * _logits(dict(params, gated_xattn=gated), _tokens(),
                                                _media(0)))
    return jax.grad(loss)(params['gated_xattn'])

  groups = LM['depth'] // 2
  at_init = gated_grads(_initial_params())
  for name, grads in at_init.items():
    if name.endswith('_gate'):  # every gate of every group gets a gradient
      assert np.all(np.asarray(grads) != 0), name
    else:  # behind tanh(0) = 0 nothing else does yet
      jax.tree.map(lambda g: np.testing.assert_array_equal(g, 0.0), grads)
  opened = gated_grads(_open_gates(_initial_params()))
  for path, grads in jax.tree_util.tree_leaves_with_path(opened):
    assert np.all(np.abs(np.asarray(grads).reshape(groups, -1)).max(-1) > 0), path

  config = ml_collections.ConfigDict({'trainable': 'gated_xattn/.*'})
  mask = train.trainable_mask(config, _initial_params())
  assert all(jax.tree.leaves(mask['gated_xattn']))
  assert not any(jax.tree.leaves(mask['lm']))


def test_unscanned_language_model_layout_gives_the_same_logits():
  params = _open_gates(_initial_params())
  blocks = params['lm']['decoder']['blocks']
  unscanned_decoder = {f'block_{i}': jax.tree.map(lambda p, i=i: p[i], blocks)
                       for i in range(LM['depth'])}
  unscanned = dict(params, lm=dict(params['lm'], decoder=unscanned_decoder))
  np.testing.assert_allclose(_forward(lm_scan=False)(unscanned, _tokens(), _media(0)),
                             _forward()(params, _tokens(), _media(0)), atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match='cross_attn_every=3 does not divide'):
    flamingo.FlamingoLM(LM, IMAGE, cross_attn_every=3).init(jax.random.key(0), _tokens(),
                                                            _media(0))


def test_decoding_with_a_cache_gives_the_logits_of_the_whole_sequence():
  """Prefill 5 tokens, then one token per call: the `<image>` tokens of rows 0 (slot 7) and
  1 (slot 9) come during decoding, so the running image count decides what later tokens see."""
  model, params = _model(), _open_gates(_initial_params())
  tokens, media = _tokens(), _media(0)
  want = np.asarray(_forward()(params, tokens, media))
  decode = jax.jit(functools.partial(model.apply, method=model.decode))
  cache = model.init_cache(len(IMAGE_AT), LENGTH)
  prefill = 5
  logits, cache = decode({'params': params}, tokens[:, :prefill], context=media, cache=cache,
                         cache_index=0)
  got = [logits]
  for slot in range(prefill, LENGTH):
    np.testing.assert_array_equal(cache['images_seen'], np.sum(tokens[:, :slot] == IMAGE, 1))
    logits, cache = decode({'params': params}, tokens[:, slot:slot + 1], context=media,
                           cache=cache, cache_index=slot)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-5, rtol=1e-5)


def _prompts():
  """Left-padded prompts: row 0 three padding slots (token 7, which must change nothing)
  and 9 tokens from its first `<image>` on, row 1 all 12 tokens."""
  tokens = np.array(_tokens())
  mask = np.ones_like(tokens, bool)
  mask[0, :3] = False
  tokens[0, :3] = 7
  return jnp.asarray(tokens), jnp.asarray(mask)


def _generate(cached, params, sampling=gen.Sampling()):
  """8 new tokens after `_prompts()`."""
  tokens, mask = _prompts()
  fn = gen.generate if cached else gen.generate_without_cache
  out = fn(_model(), {'params': params}, prompt_tokens=tokens, prompt_mask=mask,
           context=_media(0), max_new_tokens=8, rng=jax.random.key(3), sampling=sampling)
  return np.asarray(out['tokens'])


@pytest.mark.parametrize('sampling', [gen.Sampling(), gen.Sampling(temperature=1.0)],
                         ids=['greedy', 'sampled'])
def test_generation_with_a_cache_matches_recomputing_the_sequence(sampling):
  params = _open_gates(_initial_params())
  with_cache = _generate(True, params, sampling)
  np.testing.assert_array_equal(with_cache, _generate(False, params, sampling))
  assert len(np.unique(with_cache)) > 4  # not a degenerate repeat


def test_generation_at_init_is_the_language_models():
  params = _initial_params()
  tokens, mask = _prompts()
  want = gen.generate(DecoderLM(**LM), {'params': params['lm']}, prompt_tokens=tokens,
                      prompt_mask=mask, max_new_tokens=8)['tokens']
  np.testing.assert_array_equal(_generate(True, params), np.asarray(want))


def test_generation_needs_media_exactly_for_a_flamingo():
  tokens, mask = _tokens(), jnp.ones(_tokens().shape, bool)
  with pytest.raises(ValueError, match='a Flamingo reads media'):
    gen.generate(_model(), {'params': _initial_params()}, prompt_tokens=tokens, prompt_mask=mask,
                 max_new_tokens=2)
  with pytest.raises(ValueError, match='a Flamingo reads media'):
    gen.generate(DecoderLM(**LM), {'params': _initial_params()['lm']}, prompt_tokens=tokens,
                 prompt_mask=mask, context=_media(0), max_new_tokens=2)


def test_generation_refuses_more_image_tokens_than_media():
  """Row 0 shows `<image>` at 3 and 7 but the media hold one image per row: the text after
  position 7 would get exactly zero from the cross-attention. Checked on the host, for the
  gated LM and the assembled model (unbound: nothing runs)."""
  tokens, mask = _prompts()
  one_image = _media(0, images=1)
  for model in (_model(), _assembled()):
    with pytest.raises(ValueError, match=r'prompt row 0 has 2 <image> tokens \(id 63\) but the '
                       r'media hold 1 images per row: the <image> at position 7 has no image'):
      gen.generate(model, {}, prompt_tokens=tokens, prompt_mask=mask, context=one_image,
                   max_new_tokens=2)
    out_of_vocab = np.where(np.arange(LENGTH) == 10, LM['vocab_size'], tokens)
    with pytest.raises(ValueError, match=r'prompt row 0, position 10: token id 64 is outside'):
      gen.generate(model, {}, prompt_tokens=out_of_vocab, prompt_mask=mask, context=_media(0),
                   max_new_tokens=2)
  # `<image>` ids in the padding are not read (row 0: 2 real ones and 3 in its padding).
  images_in_padding = np.where(np.asarray(mask), tokens, IMAGE)
  _model().check_prompt(images_in_padding, np.asarray(mask), _media(0))


VISION = dict(patch_size=4, width=MEDIA_WIDTH, depth=1, num_heads=2)
PERCEIVER = dict(num_latents=LATENTS, depth=1, num_heads=2, head_dim=8)


def _assembled(vision_width=MEDIA_WIDTH):
  return flamingo.Flamingo(dict(VISION, width=vision_width), PERCEIVER, LM, IMAGE,
                           cross_attn_every=2, **XATTN)


def _images(seed):
  shape = (len(IMAGE_AT), IMAGES, 8, 8, 3)
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize('vision_width', [MEDIA_WIDTH, LM['width']],
                         ids=['media_projection', 'same_width'])
@pytest.mark.slow
def test_assembled_init_is_each_part_initialised_on_its_own(vision_width):
  """`Flamingo.init_params` gives bitwise the params of the recipe trained runs were
  initialised with: the rng split in 4, each part initialised alone on zeros."""
  model, rng = _assembled(vision_width), jax.random.key(5)
  got = jax.jit(lambda rng: nn.unbox(model.init_params(rng, _images(0), _tokens())))(rng)

  @jax.jit
  def per_part(rng):
    vision_rng, resampler_rng, projection_rng, text_rng = jax.random.split(rng, 4)
    vision = ViT(**dict(VISION, width=vision_width), pool='none')
    params = {'vision_tower': vision.init(vision_rng, jnp.zeros((1, 8, 8, 3)))['params']}
    patches = (8 // VISION['patch_size']) ** 2
    params['resampler'] = PerceiverResampler(**PERCEIVER).init(
        resampler_rng, jnp.zeros((1, 1, patches, vision_width)))['params']
    if vision_width != LM['width']:
      params['media_projection'] = layers.Dense(LM['width'], ('embed', None)).init(
          projection_rng, jnp.zeros((1, 1, LATENTS, vision_width)))['params']
    params.update(_model().init(text_rng, jnp.zeros((1, LENGTH), jnp.int32),
                                jnp.zeros((1, 1, LATENTS, LM['width'])))['params'])
    return nn.unbox(params)

  want = per_part(rng)
  parts = {'vision_tower', 'resampler', 'lm', 'gated_xattn'}
  assert set(got) == parts | ({'media_projection'} if vision_width != LM['width'] else set())
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  # The model's own tree (what `apply` reads) is that tree.
  shapes = jax.eval_shape(model.init, rng, _images(0), _tokens())['params']
  assert jax.tree.map(np.shape, nn.unbox(shapes)) == jax.tree.map(np.shape, got)


@pytest.mark.slow
def test_assembled_model_is_the_gated_lm_on_its_media():
  """Logits and generations of `Flamingo` are `FlamingoLM`'s on media made by hand: vision
  features (class token dropped), resampler, projection."""
  model, images = _assembled(), _images(1)
  params = _randomized(nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images,
                                               _tokens()))['params'], gate=0.1, seed=2)
  params['lm'] = _initial_params()['lm']  # the LM at init, as in the tests above
  vision = ViT(**VISION, pool='none')
  _, vision_tokens = vision.apply({'params': params['vision_tower']},
                                  images.reshape((-1, 8, 8, 3)))
  patch_tokens = vision_tokens[:, 1:]  # the class token dropped
  features = patch_tokens.reshape(images.shape[:2] + patch_tokens.shape[1:])
  media = PerceiverResampler(**PERCEIVER).apply({'params': params['resampler']}, features)
  media = layers.Dense(LM['width'], ('embed', None)).apply(
      {'params': params['media_projection']}, media)
  text_params = {'lm': params['lm'], 'gated_xattn': params['gated_xattn']}
  np.testing.assert_allclose(model.apply({'params': params}, images, method=model.media), media,
                             atol=1e-6, rtol=0)
  np.testing.assert_allclose(
      jax.jit(model.apply)({'params': params}, images, _tokens()),
      jax.jit(_model().apply)({'params': text_params}, _tokens(), media), atol=1e-5, rtol=0)
  tokens, mask = _prompts()
  generated = {}
  for name, decoder, variables in (('assembled', model, {'params': params}),
                                   ('gated_lm', _model(), {'params': text_params})):
    generated[name] = np.asarray(gen.generate(
        decoder, variables, prompt_tokens=tokens, prompt_mask=mask, context=media,
        max_new_tokens=8)['tokens'])
  np.testing.assert_array_equal(generated['assembled'], generated['gated_lm'])
  assert len(np.unique(generated['assembled'])) > 2
