"""What Hugging Face `CLIPModel` and `SiglipModel` share, for `hf_clip` and `hf_siglip`.

Both store their towers alike: `{vision,text}_model.encoder.layers.{i}` blocks of
`layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.fc{1,2}`; the patch
convolution and position table under `vision_model.embeddings`, then
`vision_model.post_layernorm`; token and position tables under `text_model.embeddings`,
then `text_model.final_layer_norm`. Their tower configs share field names too. A family
module adds its own tensors (class token, MAP head, projections, logit scale and bias)
and its architecture options (a `layout`) on top.

A layout is `{'image': {ViT option: value}, 'text': {TextTower option: value},
CLIP option: value, ...}`; options a config leaves out take the module defaults.
"""

import dataclasses
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert import weight_map
from mmjax.models.clip import CLIP, TextTower
from mmjax.models.vit import ViT

# HF `hidden_act` -> our `layers.ACTIVATIONS` key.
ACTIVATIONS = {
    'quick_gelu': 'quick_gelu',
    'gelu': 'gelu',
    'gelu_new': 'gelu_tanh',
    'gelu_pytorch_tanh': 'gelu_tanh',
}

_POSITIONS_KEY = 'vision_model.embeddings.position_embedding.weight'
_MODULES = {'image': ViT, 'text': TextTower}


def tower_config(hf_tower, scan) -> dict:
  """The width, depth, heads, MLP ratio and activation of an HF CLIP/SigLIP tower config, as
  kwargs of our towers (`scan`: blocks stacked)."""
  if hf_tower.hidden_act not in ACTIVATIONS:
    raise ValueError(f'unsupported hidden_act {hf_tower.hidden_act!r}; '
                     f'supported: {sorted(ACTIVATIONS)}')
  mlp_ratio = hf_tower.intermediate_size / hf_tower.hidden_size
  if int(hf_tower.hidden_size * mlp_ratio) != hf_tower.intermediate_size:
    raise ValueError(f'intermediate_size {hf_tower.intermediate_size} is not reproduced by '
                     f'int(hidden_size * mlp_ratio) for hidden_size {hf_tower.hidden_size}')
  return dict(width=hf_tower.hidden_size, depth=hf_tower.num_hidden_layers,
              num_heads=hf_tower.num_attention_heads, mlp_ratio=mlp_ratio,
              activation=ACTIVATIONS[hf_tower.hidden_act],
              layer_norm_eps=hf_tower.layer_norm_eps, scan=scan)


def config_from_hf(hf_config, layout: dict, *, scan: bool, **clip_kwargs) -> dict:
  """HF config's two towers + `layout` + `clip_kwargs` -> kwargs for `CLIP(...)`."""
  vision, text = hf_config.vision_config, hf_config.text_config
  return dict(
      image=dict(patch_size=vision.patch_size, **tower_config(vision, scan), **layout['image']),
      text=dict(vocab_size=text.vocab_size, context_length=text.max_position_embeddings,
                **tower_config(text, scan), **layout['text']),
      **{option: value for option, value in layout.items() if option not in _MODULES},
      **clip_kwargs)


def _defaults(module):
  return {field.name: field.default for field in dataclasses.fields(module)}


def check_layout(config: dict, layout: dict, family: str):
  """Raises ValueError naming each architecture option of `config` that `layout` forbids."""
  checks = [(f'{tower}.', config[tower], _defaults(module), layout[tower])
            for tower, module in _MODULES.items()]
  checks.append(('', config, _defaults(CLIP),
                 {option: value for option, value in layout.items() if option not in _MODULES}))
  problems = [f'{prefix}{option} is {got!r}; {family} needs {want!r}'
              for prefix, options, defaults, wanted in checks
              for option, want in wanted.items()
              if (got := options.get(option, defaults[option])) != want]
  if problems:
    raise ValueError(f'config is not the {family} layout:\n  ' + '\n  '.join(problems))


def _encoder(hf_tower, path, tower):
  """HF `{hf_tower}.encoder.layers.{i}` <-> our `{path}/block_{i}` (a `layers.Transformer`)."""
  rules = []
  for i in range(tower['depth']):
    hf, ours = f'{hf_tower}.encoder.layers.{i}', f'{path}/block_{i}'
    rules += [
        *weight_map.layer_norm(f'{hf}.layer_norm1', f'{ours}/ln_attn'),
        *weight_map.attention(f'{hf}.self_attn', f'{ours}/attn', tower['num_heads']),
        *weight_map.layer_norm(f'{hf}.layer_norm2', f'{ours}/ln_mlp'),
        *weight_map.linear(f'{hf}.mlp.fc1', f'{ours}/mlp/fc_in'),
        *weight_map.linear(f'{hf}.mlp.fc2', f'{ours}/mlp/fc_out'),
    ]
  return rules


def vision_rules(config: dict) -> list[weight_map.Rule]:
  """The image tower tensors both families have: patches, positions, blocks, `ln_post`."""
  image = config['image']
  return [
      *weight_map.conv('vision_model.embeddings.patch_embedding', 'image_tower/patch_embed',
                       bias=weight_map.option(image, ViT, 'patch_bias')),
      weight_map.one(_POSITIONS_KEY, 'image_tower/pos_embed'),
      *_encoder('vision_model', 'image_tower/transformer', image),
      *weight_map.layer_norm('vision_model.post_layernorm', 'image_tower/ln_post'),
  ]


def text_rules(config: dict) -> list[weight_map.Rule]:
  """The whole text tower up to its pooled output: tables, blocks, `ln_final`."""
  return [
      weight_map.one('text_model.embeddings.token_embedding.weight', 'text_tower/token_embed'),
      weight_map.one('text_model.embeddings.position_embedding.weight', 'text_tower/pos_embed'),
      *_encoder('text_model', 'text_tower/transformer', config['text']),
      *weight_map.layer_norm('text_model.final_layer_norm', 'text_tower/ln_final'),
  ]


def _stacked(config):
  return tuple(f'{tower}_tower/transformer' for tower in _MODULES
               if weight_map.option(config[tower], _MODULES[tower], 'scan'))


def _expected_shapes(config, num_positions):
  """`{path: shape}` of our params, blocks unstacked, for `num_positions` image positions."""
  config = dict(config, image=dict(config['image'], scan=False),
                text=dict(config['text'], scan=False))
  class_token = weight_map.option(config['image'], ViT, 'class_token')
  patches = max((num_positions or 0) - class_token, 1)
  side = math.isqrt(patches) * config['image']['patch_size']
  images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  token_ids = jax.ShapeDtypeStruct((1, config['text']['context_length']), jnp.int32)
  init = lambda rng, x, t: nn.unbox(CLIP(**config).init(rng, x, t))['params']
  shapes = jax.eval_shape(init, jax.random.key(0), images, token_ids)
  return {path: leaf.shape
          for path, leaf in flax.traverse_util.flatten_dict(shapes, sep='/').items()}


def _num_positions(array):
  return array.shape[0] if array is not None and array.ndim else None


def params_from_hf(state_dict, config: dict, rules: list[weight_map.Rule],
                   checkpoint: weight_map.Checkpoint | None = None) -> dict:
  """HF `state_dict` (torch tensors or numpy arrays) -> our float32 numpy params, by `rules`.

  HF `position_ids` buffers, which older checkpoints saved, are ignored. `checkpoint`
  (where `state_dict` was read from, if it was) is named in the errors of `to_ours`.
  """
  arrays = {key: weight_map.to_numpy(value) for key, value in state_dict.items()}
  expected = _expected_shapes(config, _num_positions(arrays.get(_POSITIONS_KEY)))
  flat = weight_map.to_ours(arrays, rules, expected, _stacked(config),
                            ignore=lambda key: key.endswith('.position_ids'),
                            checkpoint=checkpoint)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def params_to_hf(params, config: dict, rules: list[weight_map.Rule]) -> dict[str, np.ndarray]:
  """Our params (numpy or jax arrays, boxed or not) -> `{HF key: numpy array}`, by `rules`.

  Arrays keep their dtype.
  """
  flat = {path: np.asarray(value) for path, value
          in flax.traverse_util.flatten_dict(nn.unbox(params), sep='/').items()}
  expected = _expected_shapes(config, _num_positions(flat.get('image_tower/pos_embed')))
  return weight_map.to_hf(flat, rules, expected, _stacked(config))
