"""LLaVA against Hugging Face transformers and against our CLIP.

Tiny random LlavaForConditionalGeneration models built offline from configs (float32, CPU),
every weight perturbed (norms and biases included) so that no default hides a bug.
"""

import functools
import os

os.environ['HF_HUB_OFFLINE'] = '1'

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from mmjax import config_lib  # noqa: E402
from mmjax import generate  # noqa: E402
from mmjax import train  # noqa: E402
from mmjax.convert import hf_llava  # noqa: E402
from mmjax.models.decoder import DecoderLM  # noqa: E402
from mmjax.models.llava import LLaVA  # noqa: E402
from mmjax.tasks import clip as clip_task  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_TOKEN = 127
PATCHES = 16  # (16 / 4) ** 2
PAD, BOS, EOS = 0, 1, 2


def hf_llava_config(projector_act: str, num_kv_heads: int, projector_bias: bool):
  vision = transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
      image_size=16, patch_size=4, hidden_act='quick_gelu')
  # initializer_range 0.2 (not 0.02) gives logits of std ~1.5, so 1e-4 is a real tolerance
  # and greedy decoding is not decided by rounding.
  text = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=num_kv_heads, initializer_range=0.2,
      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
  return transformers.LlavaConfig(
      vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
      projector_hidden_act=projector_act, multimodal_projector_bias=projector_bias)


def hf_llava_model(*config_args):
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(hf_llava_config(*config_args)).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model


HF_CONFIGS = {  # (projector_hidden_act, num_key_value_heads, multimodal_projector_bias)
    'linear_projector': ('linear', 4, False),
    'mlp_projector_gqa': ('gelu', 2, True),
}


@functools.cache
def converted(name):
  """(HF model, our LLaVA kwargs, our params) for `HF_CONFIGS[name]`."""
  model = hf_llava_model(*HF_CONFIGS[name])
  config = hf_llava.config_from_hf(model.config)
  return model, config, hf_llava.params_from_hf(model.state_dict(), config)


def _prompts(rng, text_lengths, prompt_length):
  """Left-padded `[BOS, 2 text, PATCHES image tokens, text]` rows, as HF's processor expands
  `<image>`, and their attention mask."""
  ids = np.full((len(text_lengths), prompt_length), PAD, np.int64)
  mask = np.zeros(ids.shape, np.int64)
  for row, text_length in enumerate(text_lengths):
    sequence = np.concatenate([[BOS], rng.integers(3, 120, 2), np.full(PATCHES, IMAGE_TOKEN),
                               rng.integers(3, 120, text_length)])
    ids[row, -len(sequence):] = sequence
    mask[row, -len(sequence):] = 1
  return ids, mask


@pytest.mark.parametrize('name', HF_CONFIGS)
def test_config_from_hf(name):
  model, config, _ = converted(name)
  assert config['vision']['depth'] == model.config.vision_config.num_hidden_layers - 1
  assert config['projector_kind'] == {'linear': 'linear', 'gelu': 'mlp'}[
      model.config.projector_hidden_act]
  assert config['language_model']['num_kv_heads'] == model.config.text_config.num_key_value_heads


@pytest.mark.parametrize('name', HF_CONFIGS)
@pytest.mark.parity
def test_logits_match_hf(name):
  model, config, params = converted(name)
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
  ids, mask = _prompts(rng, (7, 7), 26)
  with torch.no_grad():
    want = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                 attention_mask=torch.tensor(mask)).logits.numpy()
  logits = jax.jit(lambda images: LLaVA(**config).apply({'params': params}, images,
                                                        jnp.asarray(ids)))
  got = logits(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  assert want.std() > 1
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)
  # The image reaches the text after it: other pixels, other logits.
  other = logits(jnp.asarray(-pixels.transpose(0, 2, 3, 1)))
  assert np.abs(np.asarray(other) - want)[:, -7:].max() > 0.1


@pytest.mark.parity
def test_greedy_generation_matches_hf():
  model, config, params = converted('mlp_projector_gqa')
  rng = np.random.default_rng(1)
  pixels = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
  ids, mask = _prompts(rng, (7, 3), 26)  # the second row is left padded
  new_tokens = 32
  with torch.no_grad():
    output = model.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                            attention_mask=torch.tensor(mask), do_sample=False,
                            max_new_tokens=new_tokens)
  want = output[:, ids.shape[1]:].numpy()  # HF stops at EOS and pads after it
  want = np.pad(want, [(0, 0), (0, new_tokens - want.shape[1])], constant_values=PAD)

  llava = LLaVA(**config)
  embeddings = jax.jit(lambda tokens, images: llava.apply(
      {'params': params}, tokens, images, method=llava.embed_inputs))(
          jnp.asarray(ids), jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  got = generate.generate(
      DecoderLM(**llava.language_model, dtype=llava.dtype), {'params': params['lm']},
      prompt_embeddings=embeddings, prompt_mask=jnp.asarray(mask, bool),
      max_new_tokens=new_tokens, stop_tokens=(EOS,), pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(got['tokens']), want)
  assert int(np.max(got['lengths'])) == new_tokens
  # LLaVA itself as the decoder: token prompts, the image features as context.
  features = jax.jit(functools.partial(llava.apply, method=llava.image_features))(
      {'params': params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  for fn in (generate.generate, generate.generate_without_cache):
    got = fn(llava, {'params': params}, prompt_tokens=jnp.asarray(ids), context=features,
             prompt_mask=jnp.asarray(mask, bool), max_new_tokens=new_tokens, stop_tokens=(EOS,),
             pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(got['tokens']), want, err_msg=fn.__name__)


def test_decoding_with_a_cache_splices_the_features_across_calls():
  """A prefill that ends among the image tokens, then one token per call: the cache's count
  of image tokens places each later feature, and the logits are those of the whole rows."""
  _, config, params = converted('mlp_projector_gqa')
  llava = LLaVA(**config)
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  tokens = jnp.asarray(_prompts(rng, (7, 7), 26)[0], jnp.int32)  # no padding
  want = jax.jit(llava.apply)({'params': params}, images, tokens)
  features = jax.jit(functools.partial(llava.apply, method=llava.image_features))(
      {'params': params}, images)
  decode = jax.jit(functools.partial(llava.apply, method=llava.decode))
  cache, got = llava.init_cache(2, tokens.shape[1]), []
  for start, stop in [(0, 10)] + [(slot, slot + 1) for slot in range(10, tokens.shape[1])]:
    logits, cache = decode({'params': params}, tokens[:, start:stop], context=features,
                           cache=cache, cache_index=start)
    got.append(logits)
  np.testing.assert_array_equal(cache['image_tokens_seen'], [PATCHES, PATCHES])
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=0, atol=1e-4)


def test_vision_params_from_clip():
  """The vision tower cut from our CLIP gives the CLIP tower's block depth-1 outputs, from
  and to stacked (scan) or unstacked blocks."""
  config = config_lib.load(os.path.join(REPO, 'configs', 'clip.py') + ':tiny',
                           {'model.image.depth': 3, 'model.scan': False})
  clip = clip_task.build_model(config)
  size = config.data.image_size
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  tokens = np.zeros((2, config.data.max_text_len), np.int32)
  # Random numpy values for every param (norms and biases too), no init to compile.
  shapes = flax.linen.unbox(jax.eval_shape(clip.init, jax.random.key(0), images, tokens))
  clip_params = jax.tree.map(lambda leaf: rng.normal(0, 0.3, leaf.shape).astype(np.float32),
                             shapes['params'])
  _, state = jax.jit(lambda params: clip.apply(
      {'params': params}, images, method=clip.encode_image,
      capture_intermediates=lambda module, _: module.name == 'block_1'))(clip_params)
  penultimate = state['intermediates']['image_tower']['transformer']['block_1']['__call__'][0][0]

  unstacked = clip_params['image_tower']
  blocks = [unstacked['transformer'][f'block_{i}'] for i in range(3)]
  stacked = dict(unstacked, transformer={
      'blocks': jax.tree.map(lambda *layers: np.stack(layers), *blocks)})
  vit = {key: value for key, value in clip_task.image_tower_kwargs(config).items()
         if key != 'kind'}
  for image_params, scan in ((stacked, True), (unstacked, True), (stacked, False)):
    llava = LLaVA(vision=dict(vit, depth=2, scan=scan),
                  language_model=dict(vocab_size=128, width=32, depth=1, num_heads=2,
                                      num_kv_heads=2, mlp_dim=64), image_token_id=IMAGE_TOKEN)
    vision_params = llava.vision_params_from_clip(image_params)
    llava_shapes = jax.eval_shape(llava.init, jax.random.key(2), images, tokens)['params']
    assert (jax.tree.structure(vision_params)
            == jax.tree.structure(flax.linen.unbox(llava_shapes['vision_tower'])))
    features = jax.jit(lambda params: llava.apply(
        {'params': {'vision_tower': params}}, images, method=llava.vision_features))(
            vision_params)
    # Float32 tolerance: scan and unrolled blocks compile to differently fused programs.
    np.testing.assert_allclose(features, penultimate[:, 1:], rtol=1e-5, atol=1e-5)


def test_two_stage_trainable_rules():
  """The recipe's `config.trainable` regexes pick the projector, then projector + LM."""
  llava = LLaVA(vision=dict(patch_size=4, width=32, depth=1, num_heads=2),
                language_model=dict(vocab_size=128, width=32, depth=1, num_heads=2,
                                    num_kv_heads=1, mlp_dim=64), image_token_id=IMAGE_TOKEN)
  params = jax.eval_shape(llava.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                          jnp.zeros((1, 6), jnp.int32))['params']
  for pattern, modules in (('projector/.*', {'projector'}),
                           ('(projector|lm)/.*', {'projector', 'lm'})):
    mask = train.trainable_mask({'trainable': pattern}, params)
    trains = {name: set(jax.tree.leaves(subtree)) for name, subtree in mask.items()}
    assert trains == {name: {name in modules} for name in ('vision_tower', 'projector', 'lm')}


def test_unsupported_hf_config_is_named():
  config = hf_llava_config('gelu', 2, True)
  config.vision_feature_select_strategy = 'full'
  config.vision_feature_layer = [-2, -1]
  with pytest.raises(ValueError, match=r"vision_feature_layer=\[-2, -1\].*\n.*strategy='full'"):
    hf_llava.config_from_hf(config)
