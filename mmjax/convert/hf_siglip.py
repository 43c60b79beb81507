"""Hugging Face `transformers` SiglipModel <-> `mmjax.models.clip.CLIP`, both ways.

    config = config_from_hf(hf_model.config, scan=True)
    params = params_from_hf(hf_model.state_dict(), config)
    CLIP(**config).apply({'params': params}, images_nhwc, token_ids)
    state_dict = params_to_hf(params, config)  # numpy arrays, HF names and layouts

SiglipModel's layout (`LAYOUT`): the ViT has a patch bias, no class token, no `ln_pre`,
and pools with a MAP head over `ln_post` of every token; its pooled output is the image
embedding (no projection, so vision width == embed_dim). The text tower is
bidirectional, pooled at the last position and projected by `text_model.head` (with
bias). Logits are `exp(logit_scale) * zimg . ztxt + logit_bias`.

HF's text tower attends to padding too unless given an `attention_mask`; SigLIP is used
without one, on texts padded to `max_position_embeddings` ("padding='max_length'"), and
our tower (which takes no mask) matches HF exactly in that use.
"""

import math

import numpy as np

from mmjax.convert import hf_common
from mmjax.convert import weight_map

LAYOUT = dict(
    image=dict(patch_bias=True, class_token=False, ln_pre=False, pool='map'),
    text=dict(causal=False, pool='last'),
    image_projection_kind='none',
    text_projection_kind='linear_bias',
)


def config_from_hf(hf_config, *, scan: bool = True) -> dict:
  """`transformers.SiglipConfig` -> kwargs for `CLIP(...)`.

  `temperature_init`/`bias_init` are big_vision's initial log(10) and -10 (the imported
  weights replace them); `max_logit_scale=None` because HF does not clip the scale.
  """
  vision, text = hf_config.vision_config, hf_config.text_config
  if not vision.vision_use_head:
    raise ValueError('SigLIP vision_use_head=False has no pooled image embedding; '
                     'only vision_use_head=True is supported')
  if text.projection_size != vision.hidden_size:
    raise ValueError(f'text projection_size {text.projection_size} differs from vision '
                     f'hidden_size {vision.hidden_size}, the image embedding size')
  return hf_common.config_from_hf(
      hf_config, LAYOUT, scan=scan, embed_dim=text.projection_size,
      temperature_init=math.log(10.0), bias_init=-10.0, max_logit_scale=None)


def rules(config: dict) -> list[weight_map.Rule]:
  """Every SiglipModel tensor and the param(s) it becomes."""
  head, map_head = 'vision_model.head', 'image_tower/map_head'
  return [
      *hf_common.vision_rules(config),
      weight_map.reshaped(f'{head}.probe', f'{map_head}/probe', (1, 1, -1), (-1,)),
      *weight_map.attention(f'{head}.attention', f'{map_head}/attn',
                            config['image']['num_heads'], packed=True),
      *weight_map.layer_norm(f'{head}.layernorm', f'{map_head}/ln'),
      *weight_map.linear(f'{head}.mlp.fc1', f'{map_head}/mlp/fc_in'),
      *weight_map.linear(f'{head}.mlp.fc2', f'{map_head}/mlp/fc_out'),
      *hf_common.text_rules(config),
      *weight_map.linear('text_model.head', 'text_projection'),
      weight_map.reshaped('logit_scale', 'temperature', (1,), ()),
      weight_map.reshaped('logit_bias', 'logit_bias', (1,), ()),
  ]


def params_from_hf(state_dict, config: dict, *, checkpoint=None) -> dict:
  """HF SiglipModel `state_dict` (torch tensors or numpy) -> our float32 numpy params.

  `config` is `config_from_hf(...)` (or any config of `LAYOUT` with a `bias_init`).
  `checkpoint`: the `weight_map.Checkpoint` the state dict was read from, if any. Raises
  ValueError naming every HF key missing (and, with a checkpoint, its directory and the
  file the key was expected in), unused or mis-shaped.
  """
  hf_common.check_layout(config, LAYOUT, 'SiglipModel')
  return hf_common.params_from_hf(state_dict, config, rules(config), checkpoint)


def params_to_hf(params, config: dict) -> dict[str, np.ndarray]:
  """Our params -> SiglipModel `state_dict` as numpy arrays. Raises ValueError naming
  every param missing, unknown or mis-shaped, with the HF key it would become.
  """
  hf_common.check_layout(config, LAYOUT, 'SiglipModel')
  return hf_common.params_to_hf(params, config, rules(config))
