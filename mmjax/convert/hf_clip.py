"""Hugging Face `transformers` CLIPModel <-> `mmjax.models.clip.CLIP`, both ways.

    config = config_from_hf(hf_model.config, scan=True)
    params = params_from_hf(hf_model.state_dict(), config)
    CLIP(**config).apply({'params': params}, images_nhwc, token_ids)
    state_dict = params_to_hf(params, config)  # numpy arrays, HF names and layouts

CLIPModel is our default layout (`LAYOUT`): ViT with a class token and `ln_pre`, causal
text tower pooled at the end-of-text token, projections without bias.

Our text tower pools at `argmax(token_ids)`; HF pools there too when `eos_token_id == 2`
(its legacy setting) and otherwise at the first `eos_token_id`. The two agree when the
end-of-text id is the highest id in every sequence, as in OpenAI's vocabulary and ours.
"""

import numpy as np

from mmjax.convert import hf_common
from mmjax.convert import weight_map

LAYOUT = dict(
    image=dict(patch_bias=False, class_token=True, ln_pre=True, pool='cls'),
    text=dict(causal=True, pool='eot'),
    image_projection_kind='linear',
    text_projection_kind='linear',
)


def config_from_hf(hf_config, *, scan: bool = True) -> dict:
  """`transformers.CLIPConfig` -> kwargs for `CLIP(...)`.

  `max_logit_scale=None` because HF does not clip `exp(logit_scale)`; set it to 100 to
  fine-tune as OpenAI trained.
  """
  return hf_common.config_from_hf(
      hf_config, LAYOUT, scan=scan, embed_dim=hf_config.projection_dim,
      temperature_init=hf_config.logit_scale_init_value, max_logit_scale=None)


def rules(config: dict) -> list[weight_map.Rule]:
  """Every CLIPModel tensor and the param(s) it becomes."""
  return [
      weight_map.one('vision_model.embeddings.class_embedding', 'image_tower/class_token'),
      *weight_map.layer_norm('vision_model.pre_layrnorm', 'image_tower/ln_pre'),  # sic
      *hf_common.vision_rules(config),
      *hf_common.text_rules(config),
      *weight_map.linear('visual_projection', 'image_projection', bias=False),
      *weight_map.linear('text_projection', 'text_projection', bias=False),
      weight_map.one('logit_scale', 'temperature'),
  ]


def params_from_hf(state_dict, config: dict, *, checkpoint=None) -> dict:
  """HF CLIPModel `state_dict` (torch tensors or numpy) -> our float32 numpy params.

  `config` is `config_from_hf(...)` (or any config of `LAYOUT`): it gives the heads to
  split q/k/v into and, per tower, whether blocks are stacked on a leading `layers` axis
  (`scan`) or named `block_{i}`. `checkpoint`: the `weight_map.Checkpoint` the state dict
  was read from, if any. Raises ValueError naming every HF key missing (and, with a
  checkpoint, its directory and the file the key was expected in), unused or mis-shaped.
  """
  hf_common.check_layout(config, LAYOUT, 'CLIPModel')
  return hf_common.params_from_hf(state_dict, config, rules(config), checkpoint)


def params_to_hf(params, config: dict) -> dict[str, np.ndarray]:
  """Our params -> CLIPModel `state_dict` as numpy arrays (`model.load_state_dict` takes
  them after `torch.from_numpy`). Raises ValueError naming every param missing, unknown
  or mis-shaped, with the HF key it would become.
  """
  hf_common.check_layout(config, LAYOUT, 'CLIPModel')
  return hf_common.params_to_hf(params, config, rules(config))
