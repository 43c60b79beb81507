"""Hugging Face `transformers` ChameleonVQVAE <-> our VQModel: encoder latents, code
indices and quantized codes equal on two tiny random-init configs; exact export round trip;
conversion errors name the tensor.

Tiny models built offline from configs (float32, CPU); every weight is perturbed (norms and
biases included) and the codebook is drawn at the latents' scale so many codes are used.
"""

import os

os.environ['HF_HUB_OFFLINE'] = '1'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from mmjax.convert import hf_chameleon_vq  # noqa: E402
from mmjax.models.vq import VQModel  # noqa: E402

pytestmark = pytest.mark.parity

# Two layouts: 2 levels without attention in the levels, 1 block each, code_dim 16; and
# 3 levels, 2 blocks each, attention at resolutions 8 and 4, factorised codes (dim 8).
CASES = {
    'two_levels': dict(base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                       attn_resolutions=None, resolution=16, latent_channels=32, embed_dim=16,
                       num_embeddings=64),
    'three_levels_attention': dict(base_channels=32, channel_multiplier=[1, 1, 2],
                                   num_res_blocks=2, attn_resolutions=[8, 4], resolution=16,
                                   latent_channels=64, embed_dim=8, num_embeddings=128),
}


def _hf_model(kwargs, seed=0):
  torch.manual_seed(seed)
  model = transformers.ChameleonVQVAE(transformers.ChameleonVQVAEConfig(**kwargs)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'embedding' in name:
        continue
      p.add_(torch.randn_like(p) * (0.2 if 'norm' in name else 0.05))
  return model


def _images(resolution, count=3, seed=0):
  rng = np.random.default_rng(seed)
  smooth = rng.uniform(-1, 1, (count, resolution // 4, resolution // 4, 3))
  images = np.kron(smooth, np.ones((1, 4, 4, 1))) + 0.2 * rng.normal(
      size=(count, resolution, resolution, 3))
  return np.clip(images, -1, 1).astype(np.float32)


@pytest.fixture(scope='module', params=sorted(CASES))
def case(request):
  kwargs = CASES[request.param]
  hf = _hf_model(kwargs)
  images = _images(kwargs['resolution'])
  pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
  with torch.no_grad():
    latents = hf.quant_conv(hf.encoder(pixels))
    # A codebook at the latents' scale, so the nearest-code search has real choices.
    hf.quantize.embedding.weight.copy_(
        torch.randn_like(hf.quantize.embedding.weight) * latents.std())
    out = hf.encode(pixels)
  config = hf_chameleon_vq.config_from_hf(hf.config)
  params = hf_chameleon_vq.params_from_hf(hf.state_dict(), config)
  return dict(hf=hf, images=images, config=config, params=params, hf_latents=latents.numpy(),
              hf_out=out)


def test_encoder_latents_and_code_indices_match(case):
  model = VQModel(**case['config'])
  variables = {'params': case['params']}
  images = jnp.asarray(case['images'])
  hf_out = case['hf_out']

  encoder_out = model.apply(variables, images, method=lambda m, x: m.encoder(x))
  np.testing.assert_allclose(
      encoder_out, hf_out.last_hidden_state.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)
  latents = model.apply(variables, images, method=model.encode)
  np.testing.assert_allclose(latents, case['hf_latents'].transpose(0, 2, 3, 1),
                             atol=1e-5, rtol=0)

  tokens = model.apply(variables, images, method=model.tokenize)
  hf_tokens = hf_out.image_tokens.numpy().reshape(tokens.shape)
  np.testing.assert_array_equal(tokens, hf_tokens)
  assert len(np.unique(hf_tokens)) >= 8, 'too few codes used for a meaningful comparison'

  quantized = model.apply(variables, latents, method=model.quantize)
  np.testing.assert_allclose(
      quantized.quantized,
      hf_out.quantized_last_hidden_state.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)
  # HF's embedding loss is mean|sg(e) - z|^2 + beta * mean|e - sg(z)|^2; both terms have the
  # value of our (unweighted) codebook and commitment losses.
  np.testing.assert_allclose(quantized.codebook_loss + 0.25 * quantized.commitment_loss,
                             hf_out.embedding_loss.item(), rtol=1e-5)
  codes = model.apply(variables, tokens, method=model.lookup)
  np.testing.assert_allclose(codes, quantized.quantized, atol=1e-6)
  # post_quant_conv is imported too: our decoder's first layer sees what HF's would.
  with torch.no_grad():
    hf_post = case['hf'].post_quant_conv(hf_out.quantized_last_hidden_state)
  ours_post = model.apply(variables, codes, method=lambda m, c: m.post_quant_conv(c))
  np.testing.assert_allclose(ours_post, hf_post.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_export_round_trip_is_exact(case):
  exported = hf_chameleon_vq.params_to_hf(case['params'], case['config'])
  state_dict = {k: v.numpy() for k, v in case['hf'].state_dict().items()}
  assert sorted(exported) == sorted(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  # Reloading into a torch model reproduces its outputs.
  reloaded = transformers.ChameleonVQVAE(case['hf'].config).eval()
  reloaded.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})
  pixels = torch.from_numpy(case['images']).permute(0, 3, 1, 2)
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded.encode(pixels).image_tokens,
                                  case['hf_out'].image_tokens)


def test_decoder_and_usage_stats_come_from_base_params():
  kwargs = CASES['two_levels']
  hf = _hf_model(kwargs)
  config = hf_chameleon_vq.config_from_hf(hf.config, restart_dead_codes=True, ema=True)
  base = hf_chameleon_vq._init(config, seed=3)
  params = hf_chameleon_vq.params_from_hf(hf.state_dict(), config, base)
  for got, want in zip(jax.tree.leaves(params['decoder']), jax.tree.leaves(base['decoder'])):
    np.testing.assert_array_equal(got, want)
  codebook = hf.quantize.embedding.weight.detach().numpy()
  np.testing.assert_array_equal(params['quantizer']['codebook'], codebook)
  np.testing.assert_allclose(params['quantizer']['usage'], 1 / 64)
  np.testing.assert_allclose(params['quantizer']['ema_sum'], codebook / 64)


def test_conversion_errors_name_the_tensor():
  kwargs = CASES['two_levels']
  hf = _hf_model(kwargs)
  config = hf_chameleon_vq.config_from_hf(hf.config)
  state_dict = dict(hf.state_dict())
  del state_dict['encoder.mid.attn_1.q.weight']
  state_dict['encoder.extra.weight'] = torch.zeros(3)
  state_dict['quant_conv.bias'] = torch.zeros(5)
  with pytest.raises(ValueError) as error:
    hf_chameleon_vq.params_from_hf(state_dict, config)
  message = str(error.value)
  assert 'HF key missing: encoder.mid.attn_1.q.weight' in message
  assert 'HF key not used: encoder.extra.weight' in message
  assert 'quant_conv.bias has shape (5,)' in message
  with pytest.raises(ValueError, match='double_latent'):
    hf_chameleon_vq.config_from_hf(transformers.ChameleonVQVAEConfig(double_latent=True))


def test_chameleon_config_is_the_published_shape():
  """configs/vq.py:chameleon = HF's default ChameleonVQVAEConfig (Chameleon 7B/34B's)."""
  from mmjax import config_lib
  from mmjax.tasks import vq as vq_task
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load(os.path.join(repo, 'configs', 'vq.py') + ':chameleon')
  ours = vq_task.model_kwargs(config)
  hf = hf_chameleon_vq.config_from_hf(transformers.ChameleonVQVAEConfig())
  assert {key: ours[key] for key in hf} == hf
  assert ours['resolution'] // 2 ** (len(ours['channel_multiplier']) - 1) == 32  # 1,024 tokens
