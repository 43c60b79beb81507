"""Hugging Face `transformers` CLIPModel / SiglipModel <-> our CLIP: numerical parity,
exact export round trips, `save_pretrained` directories and conversion errors.

Tiny random models built offline from configs (float32, CPU), every weight perturbed
(biases, norms, probe, logit scale and bias included) so that no default hides a bug.
"""

import copy
import functools
import os

os.environ['HF_HUB_OFFLINE'] = '1'

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from mmjax.convert import hf_clip  # noqa: E402
from mmjax.convert import hf_directory  # noqa: E402
from mmjax.convert import hf_siglip  # noqa: E402
from mmjax.data.tokenizers import ByteTokenizer  # noqa: E402
from mmjax.models.clip import CLIP  # noqa: E402

pytestmark = pytest.mark.parity

CAPTIONS = ['a red square', 'two small blue circles on a white page', 'x']
TOKENIZER = ByteTokenizer()
TOKEN_IDS = dict(vocab_size=384, pad_token_id=TOKENIZER.pad_id, bos_token_id=TOKENIZER.bos_id,
                 eos_token_id=TOKENIZER.eot_id)


def tower(width, depth, heads, mlp, act):
  return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
              intermediate_size=mlp, hidden_act=act)


# name -> (HF model class, its converter, config kwargs). Two of each family, differing in
# widths, depths, heads, patch and image size, text length and activation.
CASES = {
    'clip_quick_gelu': (transformers.CLIPModel, hf_clip, dict(
        vision_config=dict(image_size=32, patch_size=8, **tower(64, 2, 4, 256, 'quick_gelu')),
        text_config=dict(max_position_embeddings=32, **TOKEN_IDS,
                         **tower(64, 2, 4, 256, 'quick_gelu')),
        projection_dim=48)),
    'clip_gelu': (transformers.CLIPModel, hf_clip, dict(
        vision_config=dict(image_size=16, patch_size=4, **tower(48, 3, 3, 96, 'gelu')),
        text_config=dict(max_position_embeddings=24, **TOKEN_IDS, **tower(32, 1, 2, 128, 'gelu')),
        projection_dim=40)),
    'siglip_gelu_tanh': (transformers.SiglipModel, hf_siglip, dict(
        vision_config=dict(image_size=32, patch_size=8,
                           **tower(64, 2, 4, 256, 'gelu_pytorch_tanh')),
        text_config=dict(max_position_embeddings=16, **TOKEN_IDS,
                         **tower(64, 2, 4, 256, 'gelu_pytorch_tanh')))),
    'siglip_gelu': (transformers.SiglipModel, hf_siglip, dict(
        vision_config=dict(image_size=16, patch_size=4, **tower(48, 1, 3, 192, 'gelu')),
        text_config=dict(max_position_embeddings=24, projection_size=48, **TOKEN_IDS,
                         **tower(32, 3, 2, 96, 'gelu')))),
}


@functools.cache
def hf_model(case):
  """The case's HF model with every weight (biases and norms included) random."""
  model_class, _, kwargs = CASES[case]
  torch.manual_seed(0)
  model = model_class(model_class.config_class(**kwargs)).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model


def converter(case):
  return CASES[case][1]


def imported(case, scan):
  model, convert = hf_model(case), converter(case)
  config = convert.config_from_hf(model.config, scan=scan)
  return config, convert.params_from_hf(model.state_dict(), config)


def inputs(hf_config):
  """NHWC images in [-1, 1] and fixed-length token ids (EOT, then padding)."""
  size = hf_config.vision_config.image_size
  images = np.random.default_rng(0).uniform(-1, 1, (len(CAPTIONS), size, size, 3))
  token_ids = TOKENIZER.encode(CAPTIONS, max_len=hf_config.text_config.max_position_embeddings)
  return images.astype(np.float32), token_ids


def hf_outputs(model, images, token_ids):
  kwargs = dict(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                input_ids=torch.from_numpy(token_ids).long())
  if isinstance(model, transformers.CLIPModel):  # SigLIP is used without a padding mask
    kwargs['attention_mask'] = torch.from_numpy(token_ids != TOKENIZER.pad_id).long()
  with torch.no_grad():
    return model(**kwargs)


def assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


@pytest.mark.parametrize('scan', [True, False])
@pytest.mark.parametrize('case', CASES)
def test_matches_hf(case, scan):
  config, params = imported(case, scan)
  images, token_ids = inputs(hf_model(case).config)
  expected = hf_outputs(hf_model(case), images, token_ids)

  image, text, logit_scale, logit_bias = jax.jit(CLIP(**config).apply)(
      {'params': params}, images, token_ids)
  logits_per_image = logit_scale * image @ text.T + (0 if logit_bias is None else logit_bias)

  np.testing.assert_allclose(image, expected.image_embeds.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(text, expected.text_embeds.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(logits_per_image, expected.logits_per_image.numpy(), rtol=0,
                             atol=1e-5)


@pytest.mark.parametrize('scan', [True, False])
@pytest.mark.parametrize('case', CASES)
def test_export_is_exact(case, scan):
  config, params = imported(case, scan)
  exported = converter(case).params_to_hf(params, config)

  state_dict = hf_model(case).state_dict()
  assert sorted(exported) == sorted(state_dict)
  for key, value in state_dict.items():
    assert exported[key].dtype == np.float32, key
    assert exported[key].shape == tuple(value.shape), key
    assert np.array_equal(exported[key], value.numpy()), key
  assert_same_params(converter(case).params_from_hf(exported, config), params)


@pytest.mark.parametrize('case, dtype', [('clip_gelu', torch.float32),
                                         ('siglip_gelu_tanh', torch.bfloat16)])
def test_load_hf_directory(case, dtype, tmp_path):
  model = copy.deepcopy(hf_model(case)).to(dtype)
  model.save_pretrained(tmp_path)
  config, params = hf_directory.load_hf_directory(str(tmp_path), scan=False)
  assert config == converter(case).config_from_hf(hf_model(case).config, scan=False)
  assert_same_params(params, converter(case).params_from_hf(model.state_dict(), config))


def test_import_ignores_position_ids_buffers():
  config, params = imported('clip_quick_gelu', scan=True)
  state_dict = dict(hf_model('clip_quick_gelu').state_dict())
  state_dict['text_model.embeddings.position_ids'] = torch.arange(32)[None]
  assert_same_params(hf_clip.params_from_hf(state_dict, config), params)


@pytest.mark.parametrize('case', ['clip_quick_gelu', 'siglip_gelu'])
def test_import_names_missing_unused_and_misshaped_tensors(case):
  config, _ = imported(case, scan=True)
  state_dict = dict(hf_model(case).state_dict())
  state_dict['text_model.extra.weight'] = torch.zeros(3)
  fc1 = 'vision_model.encoder.layers.0.mlp.fc1.weight'
  state_dict[fc1] = state_dict[fc1][:-1]
  del state_dict['text_model.final_layer_norm.bias']
  with pytest.raises(ValueError) as error:
    converter(case).params_from_hf(state_dict, config)
  message = str(error.value)
  assert 'HF key not used: text_model.extra.weight' in message
  assert 'HF key missing: text_model.final_layer_norm.bias' in message
  assert f'HF key {fc1} has shape' in message
  assert 'image_tower/transformer/blocks/mlp/fc_in/kernel [layer 0]' in message

  config['text']['depth'] += 1
  with pytest.raises(ValueError, match=r'HF key missing: text_model\.encoder\.layers\.\d'):
    converter(case).params_from_hf(hf_model(case).state_dict(), config)


def test_import_names_a_packed_tensor_that_does_not_split():
  config, _ = imported('siglip_gelu', scan=False)
  state_dict = dict(hf_model('siglip_gelu').state_dict())
  key = 'vision_model.head.attention.in_proj_weight'
  state_dict[key] = state_dict[key][:-1]
  with pytest.raises(ValueError, match=f'HF key {key} of shape'):
    hf_siglip.params_from_hf(state_dict, config)


@pytest.mark.parametrize('case', ['clip_gelu', 'siglip_gelu_tanh'])
def test_export_names_missing_and_misshaped_params(case):
  config, params = imported(case, scan=True)
  params['text_tower']['transformer']['blocks']['mlp']['fc_out']['bias'] = np.zeros((1, 2))
  del params['image_tower']['ln_post']['scale']
  with pytest.raises(ValueError) as error:
    converter(case).params_to_hf(params, config)
  message = str(error.value)
  assert ('param missing: image_tower/ln_post/scale '
          '(HF key vision_model.post_layernorm.weight)') in message
  assert ('param text_tower/transformer/blocks/mlp/fc_out/bias [layer 0] '
          '(HF key text_model.encoder.layers.0.mlp.fc2.bias) has shape (2,)') in message


def test_converters_refuse_the_other_layout():
  clip_config, clip_params = imported('clip_gelu', scan=True)
  with pytest.raises(ValueError, match="image.pool is 'cls'; SiglipModel needs 'map'"):
    hf_siglip.params_to_hf(clip_params, clip_config)
  siglip_config, _ = imported('siglip_gelu', scan=True)
  with pytest.raises(ValueError, match="text.causal is False; CLIPModel needs True"):
    hf_clip.params_from_hf(hf_model('siglip_gelu').state_dict(), siglip_config)
