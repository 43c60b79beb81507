"""Hugging Face `transformers` ChameleonForConditionalGeneration <-> `mmjax.models.chameleon`.

    config = config_from_hf(hf_model.config, scan=True)   # Chameleon(**config)
    params = params_from_hf(hf_model.state_dict(), config)
    logits, _ = Chameleon(**config).apply({'params': params}, input_ids, images_nhwc)
    state_dict = params_to_hf(params, config)              # numpy arrays, HF names

Decoder: `hf_llama`'s rules under `model.` plus QK-norm (`q_norm`, `k_norm`: per-head
LayerNorm weight and bias) and `lm_head.weight`; `swin_norm=True` is
`norm_placement='swin'` (the same two RMSNorms, `input_layernorm` -> `ln_attn`,
`post_attention_layernorm` -> `ln_mlp`, moved onto the branch outputs). Image tokenizer:
`hf_chameleon_vq` under `model.vqmodel.` (HF holds no VQ decoder: ours comes from
`base_vq_params`, a fresh init by default).

Vocabulary: `config.vocabulary_map` (token name -> id) names the code tokens
`IMGIMG<code's decimal digits as letters A-J>Z` (HF `ChameleonImageVocabularyMapping`), the
placeholder `<image>`, and the markers around an image, `<racm3:break>` (begin) and
`<eoss>` (end), which `ChameleonProcessor` puts around the placeholders. The code tokens
must be contiguous ids, code k at `first + k` (as in the released vocabulary); anything
else is refused with the first code out of place.

HF masks the code tokens' logits in every forward (its released weights generate no
images): the imported config sets `mask_image_logits=True` so logits and greedy generation
match; set it False to generate images.
"""

import numpy as np

from mmjax.convert import hf_chameleon_vq
from mmjax.convert import hf_llama

BEGIN_IMAGE = '<racm3:break>'
END_IMAGE = '<eoss>'
PLACEHOLDER = '<image>'
_CODE_PREFIX = 'IMGIMG'
_VQ_PREFIX = 'model.vqmodel.'


def code_token_name(code: int) -> str:
  """HF's name of the token of VQ code `code`: 'IMGIMG' + its digits as letters A-J + 'Z'."""
  return _CODE_PREFIX + ''.join(chr(ord('A') + int(digit)) for digit in str(code)) + 'Z'


def code_of_token_name(name: str) -> int:
  """Inverse of `code_token_name` (HF `bpe2img`: the characters between 'IMGIMG' and the last
  one, letters A-J read as digits)."""
  return int(''.join(str(ord(c) - ord('A')) if 'A' <= c <= 'J' else c
                     for c in name[len(_CODE_PREFIX):-1]))


def image_vocabulary(vocabulary_map: dict, num_codes: int) -> dict:
  """HF `vocabulary_map` -> the Chameleon fields `image_token_offset`, `begin_image_id`,
  `end_image_id`, `image_placeholder_id`. Raises ValueError naming what is missing or the
  first code whose id is not `offset + code`."""
  if not vocabulary_map:
    raise ValueError('ChameleonConfig.vocabulary_map is empty: it names the image code tokens')
  missing = [name for name in (BEGIN_IMAGE, END_IMAGE) if name not in vocabulary_map]
  if missing:
    raise ValueError(f'vocabulary_map has no {missing} (the markers around an image)')
  code_ids = {code_of_token_name(name): token for name, token in vocabulary_map.items()
              if name.startswith(_CODE_PREFIX)}
  if sorted(code_ids) != list(range(num_codes)):
    raise ValueError(f'vocabulary_map names {len(code_ids)} code tokens; the VQ codebook has '
                     f'{num_codes} codes (0 .. {num_codes - 1} expected)')
  offset = code_ids[0]
  for code in range(num_codes):
    if code_ids[code] != offset + code:
      raise ValueError(f'image code {code} is token {code_ids[code]}, not {offset + code}: '
                       'only contiguous code tokens are supported')
  return dict(image_token_offset=int(offset), begin_image_id=int(vocabulary_map[BEGIN_IMAGE]),
              end_image_id=int(vocabulary_map[END_IMAGE]),
              image_placeholder_id=(int(vocabulary_map[PLACEHOLDER])
                                    if PLACEHOLDER in vocabulary_map else None))


def config_from_hf(hf_config, *, scan: bool = True) -> dict:
  """`transformers.ChameleonConfig` -> kwargs for `Chameleon(...)` (`mask_image_logits=True`,
  HF's behaviour). Raises ValueError naming each unsupported field."""
  if getattr(hf_config, 'mlp_bias', False):
    raise ValueError('ChameleonConfig mlp_bias=True (MLP biases) is not supported')
  language_model = hf_llama.config_from_hf(hf_config, scan=scan)
  language_model.update(qk_norm=True, norm_placement='swin' if hf_config.swin_norm else 'pre')
  vq = hf_chameleon_vq.config_from_hf(hf_config.vq_config)
  return dict(language_model=language_model, vq=vq,
              **image_vocabulary(hf_config.vocabulary_map, vq['num_codes']),
              mask_image_logits=True)


def params_from_hf(state_dict, config: dict, *, base_vq_params=None, checkpoint=None) -> dict:
  """HF state dict (torch tensors or numpy) -> our float32 numpy params `{'lm', 'tokenizer'}`.

  Raises ValueError naming every HF key missing, unused or mis-shaped (with a
  `weight_map.Checkpoint`, also its directory and file).
  """
  text = {key: value for key, value in state_dict.items() if not key.startswith(_VQ_PREFIX)}
  vq = {key[len(_VQ_PREFIX):]: value for key, value in state_dict.items()
        if key.startswith(_VQ_PREFIX)}
  return {'lm': hf_llama.params_from_hf(text, config['language_model'], checkpoint=checkpoint),
          'tokenizer': hf_chameleon_vq.params_from_hf(vq, config['vq'], base_vq_params,
                                                      checkpoint=checkpoint)}


def params_to_hf(params, config: dict) -> dict[str, np.ndarray]:
  """Our params -> `{HF key: numpy array}` (the VQ decoder, which HF lacks, is dropped)."""
  state_dict = hf_llama.params_to_hf(params['lm'], config['language_model'])
  state_dict.update({_VQ_PREFIX + key: value for key, value in
                     hf_chameleon_vq.params_to_hf(params['tokenizer'], config['vq']).items()})
  return state_dict
