"""Hugging Face `transformers` 5 LlavaForConditionalGeneration -> `mmjax.models.llava.LLaVA`.

    config = config_from_hf(hf_model.config, scan=True)          # LLaVA(**config)
    params = params_from_hf(hf_model.state_dict(), config)
    logits = LLaVA(**config).apply({'params': params}, images_nhwc, input_ids)

Vision tower: the CLIP vision rules of `hf_common` / `hf_clip`, moved from `vision_model.`
to `model.vision_tower.`. Our tower stops at the feature layer (`vision_feature_layer`,
-2 in LLaVA-1.5), so the HF encoder layers after it and `post_layernorm`, which LLaVA never
reads, are dropped on import. LM: `hf_llama`'s rules under `model.language_model.` and
`lm_head.weight`.

Projector: HF always has `linear_1`, act, `linear_2`. With `projector_hidden_act='gelu'`
it is LLaVA-1.5's 'mlp' projector; with `'linear'` (no activation) the two layers are one
linear map, imported as LLaVA-1's 'linear' projector: weight `W2 W1`, bias `W2 b1 + b2`,
composed in float64 (so not bit-exact, ~1e-7 relative).

From a `save_pretrained` directory: `arrays, checkpoint = hf_directory.read_checkpoint(path)`,
then `params_from_hf(arrays, config, checkpoint=checkpoint)`, whose errors name the
directory and the file each missing tensor was expected in.
"""

import dataclasses
import math
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert import hf_clip
from mmjax.convert import hf_common
from mmjax.convert import hf_llama
from mmjax.convert import weight_map
from mmjax.models.decoder import DecoderLM
from mmjax.models.llava import LLaVA
from mmjax.models.vit import ViT

# HF `projector_hidden_act` -> our projector kind.
PROJECTORS = {'gelu': 'mlp', 'linear': 'linear'}

_VISION = 'model.vision_tower.'
_PROJECTOR = 'model.multi_modal_projector.'
_LINEAR_PROJECTOR = _PROJECTOR + 'linear'  # linear_2 after linear_1, as one map
_POSITIONS_KEY = _VISION + 'embeddings.position_embedding.weight'


def config_from_hf(hf_config, *, scan: bool = True) -> dict:
  """`transformers.LlavaConfig` (CLIP vision, Llama text) -> kwargs for `LLaVA(...)`.

  The vision tower gets the blocks up to `vision_feature_layer` (HF `hidden_states`
  index: -2 = all but the last). Raises ValueError naming each unsupported field.
  """
  vision = hf_config.vision_config
  layer = hf_config.vision_feature_layer
  problems = []
  if vision.model_type != 'clip_vision_model':
    problems.append(f"vision_config.model_type={vision.model_type!r}; supported: "
                    "'clip_vision_model'")
  if not (isinstance(layer, int) and 1 <= abs(layer) <= vision.num_hidden_layers):
    problems.append(f'vision_feature_layer={layer!r}; supported: one int picking a block '
                    f'output, -{vision.num_hidden_layers}..{vision.num_hidden_layers}')
  if hf_config.vision_feature_select_strategy != 'default':
    problems.append(f'vision_feature_select_strategy='
                    f"{hf_config.vision_feature_select_strategy!r}; supported: 'default'")
  if hf_config.projector_hidden_act not in PROJECTORS:
    problems.append(f'projector_hidden_act={hf_config.projector_hidden_act!r}; supported: '
                    f'{sorted(PROJECTORS)}')
  if problems:
    raise ValueError('LlavaConfig not supported:\n  ' + '\n  '.join(problems))
  image_layout = {option: value for option, value in hf_clip.LAYOUT['image'].items()
                  if option != 'pool'}
  vision_kwargs = dict(patch_size=vision.patch_size,
                       **hf_common.tower_config(vision, scan),
                       **image_layout)
  vision_kwargs['depth'] = layer % (vision.num_hidden_layers + 1)
  language_model = hf_llama.config_from_hf(hf_config.text_config, scan=scan)
  language_model['tie_embeddings'] = bool(hf_config.tie_word_embeddings)
  return dict(vision=vision_kwargs, language_model=language_model,
              image_token_id=hf_config.image_token_id,
              projector_kind=PROJECTORS[hf_config.projector_hidden_act],
              projector_bias=bool(hf_config.multimodal_projector_bias))


def _vision_rules(vision: dict) -> list[weight_map.Rule]:
  """hf_clip's image-tower rules without `ln_post`, moved to LLaVA's keys and paths."""
  clip_rules = [
      weight_map.one('vision_model.embeddings.class_embedding', 'image_tower/class_token'),
      *weight_map.layer_norm('vision_model.pre_layrnorm', 'image_tower/ln_pre'),
      *hf_common.vision_rules({'image': vision}),
  ]
  return [dataclasses.replace(
      rule, hf_key=_VISION + rule.hf_key.removeprefix('vision_model.'),
      paths=tuple('vision_tower/' + path.removeprefix('image_tower/') for path in rule.paths))
          for rule in clip_rules if not rule.paths[0].startswith('image_tower/ln_post/')]


def rules(config: dict) -> list[weight_map.Rule]:
  """Every imported HF tensor and the param(s) it becomes (the 'linear' projector's key
  `model.multi_modal_projector.linear` is the composed map, see the module docstring)."""
  bias = weight_map.option(config, LLaVA, 'projector_bias')
  if weight_map.option(config, LLaVA, 'projector_kind') == 'linear':
    projector = weight_map.linear(_LINEAR_PROJECTOR, 'projector/fc1', bias)
  else:
    projector = [*weight_map.linear(_PROJECTOR + 'linear_1', 'projector/fc1', bias),
                 *weight_map.linear(_PROJECTOR + 'linear_2', 'projector/fc2', bias)]
  return [*_vision_rules(config['vision']), *projector,
          *hf_llama.rules(config['language_model'], hf_prefix='model.language_model.',
                          path='lm/')]


def _compose_linear_projector(arrays: dict, bias: bool, checkpoint) -> dict:
  """Replaces HF's `linear_1`, `linear_2` by the one map `linear_2(linear_1(x))`.

  Raises ValueError naming each of them that `arrays` lacks (and where it was expected).
  """
  names = ('linear_1.weight', 'linear_2.weight') + (('linear_1.bias', 'linear_2.bias')
                                                    if bias else ())
  weight_map.check_present(arrays, [_PROJECTOR + name for name in names], checkpoint,
                           why=" (LLaVA-1's 'linear' projector composes linear_1 and linear_2)")
  arrays = dict(arrays)
  pop = lambda name: np.float64(arrays.pop(f'{_PROJECTOR}{name}'))
  weight_1, weight_2 = pop('linear_1.weight'), pop('linear_2.weight')
  arrays[f'{_LINEAR_PROJECTOR}.weight'] = np.float32(weight_2 @ weight_1)
  if bias:
    bias_1, bias_2 = pop('linear_1.bias'), pop('linear_2.bias')
    arrays[f'{_LINEAR_PROJECTOR}.bias'] = np.float32(weight_2 @ bias_1 + bias_2)
  return arrays


def _expected_shapes(config: dict, num_positions: int | None) -> dict[str, tuple[int, ...]]:
  """`{path: shape}` of LLaVA's params, blocks unstacked, for `num_positions` positions."""
  model = LLaVA(**dict(config, vision=dict(config['vision'], scan=False),
                       language_model=dict(config['language_model'], scan=False)))
  patches = max((num_positions or 0) - 1, 1)  # the class token has a position too
  side = math.isqrt(patches) * config['vision']['patch_size']
  images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  init = lambda rng, x, t: nn.unbox(model.init(rng, x, t))['params']
  shapes = jax.eval_shape(init, jax.random.key(0), images, tokens)
  return {path: leaf.shape
          for path, leaf in flax.traverse_util.flatten_dict(shapes, sep='/').items()}


def params_from_hf(state_dict, config: dict, *, checkpoint=None) -> dict:
  """HF LlavaForConditionalGeneration `state_dict` (torch or numpy) -> our float32 numpy params.

  `config` is `config_from_hf(...)`. The vision encoder layers from `vision['depth']` on,
  `post_layernorm` and, with tied embeddings, `lm_head.weight` are not used. `checkpoint`:
  the `weight_map.Checkpoint` the state dict was read from, if any. Raises ValueError
  naming every other HF key missing (and, with a checkpoint, its directory and the file the
  key was expected in), unused or mis-shaped.
  """
  arrays = {key: weight_map.to_numpy(value) for key, value in state_dict.items()}
  if weight_map.option(config, LLaVA, 'projector_kind') == 'linear':
    arrays = _compose_linear_projector(
        arrays, weight_map.option(config, LLaVA, 'projector_bias'), checkpoint)
  depth = config['vision']['depth']
  later_layer = re.compile(re.escape(_VISION) + r'encoder\.layers\.(\d+)\.')

  def dropped(key):
    match = later_layer.match(key)
    return (key.startswith(_VISION + 'post_layernorm.') or key.endswith('.position_ids')
            or (match is not None and int(match[1]) >= depth)
            or (weight_map.option(config['language_model'], DecoderLM, 'tie_embeddings')
                and key == 'lm_head.weight'))

  stacked = (('vision_tower/transformer',) if weight_map.option(config['vision'], ViT, 'scan') else ()) + (
      hf_llama.stacked(config['language_model'], 'lm/'))
  positions = arrays.get(_POSITIONS_KEY)
  num_positions = positions.shape[0] if positions is not None and positions.ndim else None
  flat = weight_map.to_ours(arrays, rules(config), _expected_shapes(config, num_positions),
                            stacked, ignore=dropped, checkpoint=checkpoint)
  return flax.traverse_util.unflatten_dict(flat, sep='/')
