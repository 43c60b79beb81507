"""Import Hugging Face `transformers` CLIPModel weights into `mmjax.models.clip.CLIP`.

    config = config_from_hf(hf_model.config, scan=True)
    params = params_from_hf(hf_model.state_dict(), config)
    CLIP(**config).apply({'params': params}, images_nhwc, token_ids)

Our text tower pools at `argmax(token_ids)`; HF pools there too when `eos_token_id == 2`
(its legacy setting) and otherwise at the first `eos_token_id`. The two agree when the
end-of-text id is the highest id in every sequence, as in OpenAI's vocabulary and ours.
"""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.clip import CLIP

# HF `hidden_act` -> our `layers.ACTIVATIONS` key.
ACTIVATIONS = {
    'quick_gelu': 'quick_gelu',
    'gelu': 'gelu',
    'gelu_new': 'gelu_tanh',
    'gelu_pytorch_tanh': 'gelu_tanh',
}


def _tower_config(hf_config, scan):
  if hf_config.hidden_act not in ACTIVATIONS:
    raise ValueError(f'unsupported hidden_act {hf_config.hidden_act!r}; '
                     f'supported: {sorted(ACTIVATIONS)}')
  mlp_ratio = hf_config.intermediate_size / hf_config.hidden_size
  if int(hf_config.hidden_size * mlp_ratio) != hf_config.intermediate_size:
    raise ValueError(f'intermediate_size {hf_config.intermediate_size} is not reproduced by '
                     f'int(hidden_size * mlp_ratio) for hidden_size {hf_config.hidden_size}')
  return dict(width=hf_config.hidden_size, depth=hf_config.num_hidden_layers,
              num_heads=hf_config.num_attention_heads, mlp_ratio=mlp_ratio,
              activation=ACTIVATIONS[hf_config.hidden_act],
              layer_norm_eps=hf_config.layer_norm_eps, scan=scan)


def config_from_hf(hf_config, *, scan: bool = True) -> dict:
  """`transformers.CLIPConfig` -> kwargs for `CLIP(...)`."""
  vision, text = hf_config.vision_config, hf_config.text_config
  return dict(
      image=dict(patch_size=vision.patch_size, **_tower_config(vision, scan)),
      text=dict(vocab_size=text.vocab_size, context_length=text.max_position_embeddings,
                **_tower_config(text, scan)),
      embed_dim=hf_config.projection_dim,
      temperature_init=hf_config.logit_scale_init_value)


def _to_numpy(x):
  if hasattr(x, 'detach'):  # torch.Tensor, possibly bfloat16, which numpy lacks
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, np.float32)


class _StateDict:
  """HF weights as float32 numpy arrays; remembers which keys were read."""

  def __init__(self, state_dict):
    self.arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
    self.used = set()

  def __call__(self, key):
    if key not in self.arrays:
      raise ValueError(f'HF state_dict has no {key!r}')
    self.used.add(key)
    return self.arrays[key]

  def layer_norm(self, prefix):
    return {'scale': self(f'{prefix}.weight'), 'bias': self(f'{prefix}.bias')}

  def linear(self, prefix):
    return {'kernel': self(f'{prefix}.weight').T, 'bias': self(f'{prefix}.bias')}


def _block(hf, prefix, num_heads):
  attn = f'{prefix}.self_attn'
  width = hf(f'{attn}.out_proj.weight').shape[0]
  head_dim = width // num_heads

  def project_in(name):
    return {'kernel': hf(f'{attn}.{name}.weight').T.reshape(width, num_heads, head_dim),
            'bias': hf(f'{attn}.{name}.bias').reshape(num_heads, head_dim)}

  return {
      'ln_attn': hf.layer_norm(f'{prefix}.layer_norm1'),
      'attn': {
          'query': project_in('q_proj'),
          'key': project_in('k_proj'),
          'value': project_in('v_proj'),
          'out': {'kernel': hf(f'{attn}.out_proj.weight').T.reshape(num_heads, head_dim, width),
                  'bias': hf(f'{attn}.out_proj.bias')},
      },
      'ln_mlp': hf.layer_norm(f'{prefix}.layer_norm2'),
      'mlp': {'fc_in': hf.linear(f'{prefix}.mlp.fc1'), 'fc_out': hf.linear(f'{prefix}.mlp.fc2')},
  }


def _transformer(hf, prefix, tower):
  blocks = [_block(hf, f'{prefix}.encoder.layers.{i}', tower['num_heads'])
            for i in range(tower['depth'])]
  if tower['scan']:
    return {'blocks': jax.tree.map(lambda *layers: np.stack(layers), *blocks)}
  return {f'block_{i}': block for i, block in enumerate(blocks)}


def _expected_shapes(config, params):
  """Our init's param shapes, for images of the size the position table was made for."""
  patches = params['image_tower']['pos_embed'].shape[0] - 1
  side = math.isqrt(patches) * config['image']['patch_size']
  images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  token_ids = jax.ShapeDtypeStruct((1, config['text']['context_length']), jnp.int32)
  init = lambda rng, x, t: nn.unbox(CLIP(**config).init(rng, x, t))['params']
  return jax.eval_shape(init, jax.random.key(0), images, token_ids)


def params_from_hf(state_dict, config: dict) -> dict:
  """HF CLIPModel `state_dict` (torch tensors or numpy) -> our float32 numpy params.

  `config` is `config_from_hf(...)`: it gives the heads to split q/k/v into and, per tower,
  whether blocks are stacked on a leading `layers` axis (`scan`) or named `block_{i}`.
  Raises ValueError naming every HF key left unused and every param not filled.
  """
  hf = _StateDict(state_dict)
  image, text = config['image'], config['text']
  params = {
      'image_tower': {
          'patch_embed': {'kernel': hf('vision_model.embeddings.patch_embedding.weight')
                          .transpose(2, 3, 1, 0)},  # OIHW -> HWIO
          'class_token': hf('vision_model.embeddings.class_embedding'),
          'pos_embed': hf('vision_model.embeddings.position_embedding.weight'),
          'ln_pre': hf.layer_norm('vision_model.pre_layrnorm'),  # sic: HF's spelling
          'transformer': _transformer(hf, 'vision_model', image),
          'ln_post': hf.layer_norm('vision_model.post_layernorm'),
      },
      'text_tower': {
          'token_embed': hf('text_model.embeddings.token_embedding.weight'),
          'pos_embed': hf('text_model.embeddings.position_embedding.weight'),
          'transformer': _transformer(hf, 'text_model', text),
          'ln_final': hf.layer_norm('text_model.final_layer_norm'),
      },
      'image_projection': {'kernel': hf('visual_projection.weight').T},
      'text_projection': {'kernel': hf('text_projection.weight').T},
      'temperature': hf('logit_scale'),
  }

  problems = [f'HF key not used: {key}' for key in sorted(set(hf.arrays) - hf.used)]
  expected = flax.traverse_util.flatten_dict(_expected_shapes(config, params), sep='/')
  got = flax.traverse_util.flatten_dict(params, sep='/')
  problems += [f'param not filled: {path}' for path in sorted(set(expected) - set(got))]
  problems += [f'param not in the model: {path}' for path in sorted(set(got) - set(expected))]
  problems += [f'shape of {path}: HF gives {got[path].shape}, the model wants '
               f'{expected[path].shape}'
               for path in sorted(set(got) & set(expected))
               if got[path].shape != expected[path].shape]
  if problems:
    raise ValueError('HF CLIP weights do not fit the model:\n  ' + '\n  '.join(problems))
  return params
