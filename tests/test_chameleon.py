"""Chameleon against Hugging Face transformers: imported tiny ChameleonForConditionalGeneration
models (both `swin_norm` settings) give torch's logits on left-padded batches with `<image>`
placeholders, and greedy generation equals `generate` token for token; the vocabulary
mapping and the shared-layer options (QK-norm, norm placement, dropout) on their own.

Tiny random models built offline from configs (float32, CPU); every weight is perturbed
(norms and biases included) and the VQ codebook is drawn at the latents' scale, so the
images become many different codes.
"""

import functools
import os

os.environ['HF_HUB_OFFLINE'] = '1'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from mmjax import generate  # noqa: E402
from mmjax.convert import hf_chameleon  # noqa: E402
from mmjax.models import layers  # noqa: E402
from mmjax.models.chameleon import Chameleon  # noqa: E402
from mmjax.models.decoder import DecoderBlock, DecoderLM  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
TEXT = 40  # text ids 0..39
NUM_CODES = 32
CODES_PER_IMAGE = 16  # 16 px images, 3 levels: a 4x4 latent grid


def vocabulary_map():
  """Text tokens, the placeholder and markers, then the code tokens (contiguous, as the
  released vocabulary)."""
  names = {f'<t{i}>': i for i in range(TEXT)}
  names.update({'<image>': TEXT, '<racm3:break>': TEXT + 1, '<eoss>': TEXT + 2})
  names.update({hf_chameleon.code_token_name(code): TEXT + 3 + code
                for code in range(NUM_CODES)})
  return names


VOCAB = TEXT + 3 + NUM_CODES
IMAGE, BEGIN, END = TEXT, TEXT + 1, TEXT + 2


@functools.cache
def converted(swin_norm: bool):
  """(HF model, our Chameleon kwargs, our params)."""
  config = transformers.ChameleonConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, swin_norm=swin_norm,
      vocabulary_map=vocabulary_map(), max_position_embeddings=128, initializer_range=0.2,
      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
      vq_config=dict(embed_dim=8, num_embeddings=NUM_CODES, base_channels=32,
                     channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=None,
                     resolution=16, latent_channels=32))
  torch.manual_seed(0)
  model = transformers.ChameleonForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'embedding' not in name:
        param.add_(torch.randn_like(param) * (0.2 if 'norm' in name else 0.05))
    vq = model.model.vqmodel
    latents = vq.quant_conv(vq.encoder(torch.from_numpy(_images(8, seed=1)).permute(0, 3, 1, 2)))
    vq.quantize.embedding.weight.copy_(torch.randn_like(vq.quantize.embedding.weight)
                                       * latents.std())
  ours = hf_chameleon.config_from_hf(model.config)
  return model, ours, hf_chameleon.params_from_hf(model.state_dict(), ours)


def _images(count, seed=0):
  rng = np.random.default_rng(seed)
  smooth = np.kron(rng.uniform(-1, 1, (count, 4, 4, 3)), np.ones((1, 4, 4, 1)))
  return np.clip(smooth + 0.2 * rng.normal(size=smooth.shape), -1, 1).astype(np.float32)


def _prompts(rng, text_lengths, prompt_length):
  """Left-padded `[BOS, 2 text, begin, 16 <image>, end, text]` rows, as ChameleonProcessor
  expands `<image>`, and their attention mask."""
  ids = np.full((len(text_lengths), prompt_length), PAD, np.int64)
  mask = np.zeros(ids.shape, np.int64)
  for row, text_length in enumerate(text_lengths):
    sequence = np.concatenate([[BOS], rng.integers(3, TEXT, 2), [BEGIN],
                               np.full(CODES_PER_IMAGE, IMAGE), [END],
                               rng.integers(3, TEXT, text_length)])
    ids[row, -len(sequence):] = sequence
    mask[row, -len(sequence):] = 1
  return ids, mask


def test_image_vocabulary_of_the_hf_mapping():
  got = hf_chameleon.image_vocabulary(vocabulary_map(), NUM_CODES)
  assert got == dict(image_token_offset=TEXT + 3, begin_image_id=BEGIN, end_image_id=END,
                     image_placeholder_id=IMAGE)
  # HF's own reading of the names: code -> token id.
  mapping = transformers.models.chameleon.modeling_chameleon.ChameleonImageVocabularyMapping(
      vocabulary_map())
  assert mapping.img2bpe == {code: TEXT + 3 + code for code in range(NUM_CODES)}
  assert hf_chameleon.code_token_name(8191) == 'IMGIMGIBJBZ'
  shuffled = dict(vocabulary_map(), **{hf_chameleon.code_token_name(5): 0})
  with pytest.raises(ValueError, match='image code 5 is token 0'):
    hf_chameleon.image_vocabulary(shuffled, NUM_CODES)
  with pytest.raises(ValueError, match='64 codes'):
    hf_chameleon.image_vocabulary(vocabulary_map(), 64)


@pytest.mark.parity
@pytest.mark.parametrize('swin_norm', [False, True])
def test_logits_match_hf_on_left_padded_image_prompts(swin_norm):
  model, config, params = converted(swin_norm)
  rng = np.random.default_rng(0)
  images = _images(2)
  ids, mask = _prompts(rng, (7, 3), 30)  # the second row is left padded by 4
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    want = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions),
                 pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).logits.numpy()
    hf_codes = model.model.get_image_tokens(torch.from_numpy(images).permute(0, 3, 1, 2))
  chameleon = Chameleon(**config)
  got, _ = jax.jit(lambda tokens, images, positions, kv_mask: chameleon.apply(
      {'params': params}, tokens, images, positions=positions, kv_mask=kv_mask))(
          jnp.asarray(ids), jnp.asarray(images), jnp.asarray(positions),
          jnp.asarray(mask, bool))
  got = np.asarray(got)
  real = mask.astype(bool)
  text_columns = np.arange(VOCAB) < TEXT + 3
  assert want[real][:, text_columns].std() > 1
  np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-4)
  # Masked: the code columns sit at float32's minimum in both (HF's masking, our flag).
  assert (got[..., ~text_columns] == np.finfo(np.float32).min).all()
  # The placeholders became the codes HF's tokenizer gives, and several different ones.
  expanded = np.asarray(chameleon.apply({'params': params}, jnp.asarray(ids),
                                        jnp.asarray(images), method=chameleon.image_token_ids))
  np.testing.assert_array_equal(expanded[ids == IMAGE].reshape(2, -1), hf_codes.numpy())
  assert len(np.unique(hf_codes.numpy())) > 8
  # The image reaches the text after it: other images, other logits.
  other, _ = chameleon.apply({'params': params}, jnp.asarray(ids), jnp.asarray(images[::-1]),
                             positions=jnp.asarray(positions), kv_mask=jnp.asarray(mask, bool))
  assert np.abs(np.asarray(other) - want)[:, -3:][..., text_columns].max() > 0.1


@pytest.mark.parity
@pytest.mark.parametrize('swin_norm', [False, True])
def test_greedy_generation_matches_hf(swin_norm):
  model, config, params = converted(swin_norm)
  rng = np.random.default_rng(1)
  images = _images(2, seed=2)
  ids, mask = _prompts(rng, (6, 2), 29)
  new_tokens = 24
  with torch.no_grad():
    output = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                            do_sample=False, max_new_tokens=new_tokens)
  want = output[:, ids.shape[1]:].numpy()  # HF stops at EOS and pads after it
  want = np.pad(want, [(0, 0), (0, new_tokens - want.shape[1])], constant_values=PAD)
  assert len(np.unique(want)) > 2  # not one token repeated
  chameleon = Chameleon(**config)
  tokens = chameleon.apply({'params': params}, jnp.asarray(ids), jnp.asarray(images),
                           method=chameleon.image_token_ids)
  for fn in (generate.generate, generate.generate_without_cache):
    got = fn(chameleon, {'params': params}, prompt_tokens=tokens,
             prompt_mask=jnp.asarray(mask, bool), max_new_tokens=new_tokens, stop_tokens=(EOS,),
             pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(got['tokens']), want, err_msg=fn.__name__)


@pytest.mark.parity
def test_export_round_trip_is_exact():
  model, config, params = converted(True)
  exported = hf_chameleon.params_to_hf(params, config)
  state_dict = {key: value.numpy() for key, value in model.state_dict().items()}
  assert sorted(exported) == sorted(state_dict)
  for key, value in exported.items():
    np.testing.assert_array_equal(value, state_dict[key], err_msg=key)


def test_placeholders_left_in_a_prompt_are_named():
  _, config, _ = converted(False)
  ids, mask = _prompts(np.random.default_rng(0), (3,), 24)
  with pytest.raises(ValueError, match=r'row 0, position 4: an <image> placeholder'):
    Chameleon(**config).check_prompt(ids, mask.astype(bool))


def test_head_layer_norm_normalises_each_head_with_its_own_scale():
  """QK-norm against numpy: moments over head_dim only, then head h's own scale and bias."""
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, (2, 5, 3, 8)).astype(np.float32)
  scale, bias = rng.normal(size=(2, 3, 8)).astype(np.float32)
  got = layers.HeadLayerNorm().apply({'params': {'scale': scale, 'bias': bias}}, x)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(got), (x - mean) / np.sqrt(var + 1e-5) * scale + bias,
                             rtol=1e-5, atol=1e-5)


def _block_params(block, x):
  args = (jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]), None, None, None)
  return block.init(jax.random.key(0), x, *args)['params'], args


def test_swin_placement_normalises_the_branch_outputs():
  """'swin' against the formula, with 'pre''s own modules: h = x + rms(attn(x)), out = h +
  rms(mlp(h)); and 'pre' differs from it."""
  x = jax.random.normal(jax.random.key(1), (2, 6, 16)) * 3
  kwargs = dict(num_heads=4, num_kv_heads=2, mlp_dim=32, qk_norm=True)
  params, args = _block_params(DecoderBlock(**kwargs, norm_placement='swin'), x)
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape),
                        params)
  got, _ = DecoderBlock(**kwargs, norm_placement='swin').apply({'params': params}, x, *args)
  attention = layers.Attention(4, causal=True, num_kv_heads=2, use_bias=False, rope_theta=1e4,
                               qk_norm=True)
  rms = lambda p, y: layers.RMSNorm(1e-6).apply({'params': p}, y)
  h = x + rms(params['ln_attn'], attention.apply({'params': params['attn']}, x,
                                                 positions=args[0]))
  mlp = layers.GatedMlp(32).apply({'params': params['mlp']}, h)
  np.testing.assert_allclose(np.asarray(got), np.asarray(h + rms(params['ln_mlp'], mlp)),
                             rtol=1e-5, atol=1e-5)
  pre, _ = DecoderBlock(**kwargs).apply({'params': params}, x, *args)
  assert np.abs(np.asarray(pre) - np.asarray(got)).max() > 0.1
  with pytest.raises(ValueError, match="norm_placement='post'"):
    DecoderBlock(**kwargs, norm_placement='post').init(jax.random.key(0), x, *args)


def test_dropout_acts_only_with_a_dropout_rng():
  lm = DecoderLM(vocab_size=50, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                 dropout_rate=0.5)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 7)))
  params = lm.init(jax.random.key(0), tokens)['params']
  plain, _ = lm.apply({'params': params}, tokens)
  no_dropout, _ = lm.clone(dropout_rate=0.0).apply({'params': params}, tokens)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(no_dropout))
  first, _ = lm.apply({'params': params}, tokens, rngs={'dropout': jax.random.key(1)})
  again, _ = lm.apply({'params': params}, tokens, rngs={'dropout': jax.random.key(1)})
  other, _ = lm.apply({'params': params}, tokens, rngs={'dropout': jax.random.key(2)})
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert np.abs(np.asarray(first) - np.asarray(plain)).max() > 0.1
  assert np.abs(np.asarray(first) - np.asarray(other)).max() > 0.1
