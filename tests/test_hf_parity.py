"""Numerical parity with Hugging Face `transformers` CLIPModel (tiny random model, float32, CPU)."""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers

from mmjax.convert import hf_clip
from mmjax.data.tokenizer import ByteTokenizer
from mmjax.models.clip import CLIP

CAPTIONS = ['a red square', 'two small blue circles on a white page', 'x']


@functools.cache
def hf_model(hidden_act):
  """A tiny CLIPModel whose every weight (biases and norms included) is random."""
  torch.manual_seed(0)
  tokenizer = ByteTokenizer()
  tower = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=256, hidden_act=hidden_act)
  config = transformers.CLIPConfig(
      vision_config=dict(image_size=32, patch_size=8, **tower),
      text_config=dict(vocab_size=384, max_position_embeddings=32, pad_token_id=tokenizer.pad_id,
                       bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eot_id, **tower),
      projection_dim=48)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model


def inputs():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, size=(len(CAPTIONS), 32, 32, 3)).astype(np.float32)
  token_ids = ByteTokenizer().encode(CAPTIONS, max_len=32)
  return images, token_ids


@pytest.mark.parametrize('scan', [True, False])
@pytest.mark.parametrize('hidden_act', ['quick_gelu', 'gelu'])
def test_clip_matches_hf(scan, hidden_act):
  model = hf_model(hidden_act)
  config = hf_clip.config_from_hf(model.config, scan=scan)
  params = hf_clip.params_from_hf(model.state_dict(), config)
  images, token_ids = inputs()

  with torch.no_grad():
    expected = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                     input_ids=torch.from_numpy(token_ids).long(),
                     attention_mask=torch.from_numpy(token_ids != 0).long())
  image, text, logit_scale, _ = jax.jit(CLIP(**config).apply)({'params': params}, images,
                                                               token_ids)
  logits_per_image = logit_scale * image @ text.T

  np.testing.assert_allclose(image, expected.image_embeds.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(text, expected.text_embeds.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(logits_per_image, expected.logits_per_image.numpy(), rtol=0,
                             atol=1e-5)


def test_params_from_hf_names_unused_and_missing_weights():
  model = hf_model('quick_gelu')
  config = hf_clip.config_from_hf(model.config)
  state_dict = dict(model.state_dict())
  state_dict['text_model.extra.weight'] = torch.zeros(3)
  with pytest.raises(ValueError, match='HF key not used: text_model.extra.weight'):
    hf_clip.params_from_hf(state_dict, config)
  config['text']['depth'] = 3
  with pytest.raises(ValueError, match='text_model.encoder.layers.2'):
    hf_clip.params_from_hf(model.state_dict(), config)
