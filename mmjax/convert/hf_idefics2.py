"""Hugging Face `transformers` Idefics2 perceiver resampler -> `PerceiverResampler` ('idefics2').

    config = config_from_hf(hf_model.config, scan=True)        # PerceiverResampler(**config)
    params = params_from_hf(hf_model.state_dict(), config)
    latents = PerceiverResampler(**config).apply({'params': params}, context, context_mask)

Only the resampler is imported: the keys under `prefix`
(`model.connector.perceiver_resampler.` in Idefics2ForConditionalGeneration,
`connector.perceiver_resampler.` in Idefics2Model). Everything else in the state dict is
ignored, including the connector's `modality_projection` (the SwiGLU from vision width to
text width that HF runs before the resampler): our resampler takes its output.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.convert import hf_common
from mmjax.convert import hf_llama
from mmjax.convert import weight_map
from mmjax.models.resampler import PerceiverResampler

PREFIX = 'model.connector.perceiver_resampler.'

# HF `hidden_act` -> our `layers.ACTIVATIONS` key.
_ACTIVATIONS = dict(hf_common.ACTIVATIONS, silu='silu')


def config_from_hf(hf_config, *, scan: bool = True) -> dict:
  """`Idefics2Config` (or its `perceiver_config`) -> kwargs for `PerceiverResampler(...)`."""
  perceiver = getattr(hf_config, 'perceiver_config', hf_config)
  if perceiver.hidden_act not in _ACTIVATIONS:
    raise ValueError(f'perceiver_config.hidden_act={perceiver.hidden_act!r}; supported: '
                     f'{sorted(_ACTIVATIONS)}')
  return dict(layout='idefics2', num_latents=perceiver.resampler_n_latents,
              depth=perceiver.resampler_depth, num_heads=perceiver.resampler_n_heads,
              head_dim=perceiver.resampler_head_dim,
              num_kv_heads=perceiver.num_key_value_heads, mlp_ratio=4,
              activation=_ACTIVATIONS[perceiver.hidden_act], norm_eps=perceiver.rms_norm_eps,
              scan=scan)


def rules(config: dict, prefix: str = PREFIX) -> list[weight_map.Rule]:
  """Every resampler tensor under `prefix` and the param it becomes (blocks unstacked)."""
  result = [weight_map.one(f'{prefix}latents', 'latents')]
  for i in range(config['depth']):
    hf, ours = f'{prefix}layers.{i}', f'transformer/block_{i}'
    result += [
        weight_map.one(f'{hf}.input_latents_norm.weight', f'{ours}/ln_latents/scale'),
        weight_map.one(f'{hf}.input_context_norm.weight', f'{ours}/ln_features/scale'),
        *hf_llama.attention_rules(
            f'{hf}.self_attn', f'{ours}/attn', config['num_heads'], config['num_kv_heads'],
            bias=False),
        weight_map.one(f'{hf}.post_attention_layernorm.weight', f'{ours}/ln_mlp/scale'),
        *weight_map.linear(f'{hf}.mlp.gate_proj', f'{ours}/mlp/gate', bias=False),
        *weight_map.linear(f'{hf}.mlp.up_proj', f'{ours}/mlp/up', bias=False),
        *weight_map.linear(f'{hf}.mlp.down_proj', f'{ours}/mlp/down', bias=False),
    ]
  return result + [weight_map.one(f'{prefix}norm.weight', 'ln_final/scale')]


def expected_shapes(config: dict, width: int) -> dict[str, tuple[int, ...]]:
  """`{param path: shape}` of the resampler's params for features of `width`, blocks unstacked."""
  resampler = PerceiverResampler(**dict(config, scan=False))
  features = jax.ShapeDtypeStruct((1, 1, width), jnp.float32)
  init = lambda rng, x: nn.unbox(resampler.init(rng, x))['params']
  shapes = jax.eval_shape(init, jax.random.key(0), features)
  return {path: leaf.shape
          for path, leaf in flax.traverse_util.flatten_dict(shapes, sep='/').items()}


def params_from_hf(state_dict, config: dict, *, prefix: str = PREFIX, checkpoint=None) -> dict:
  """HF Idefics2 `state_dict` (torch tensors or numpy) -> our float32 numpy resampler params.

  `config` is `config_from_hf(...)`; the width is that of HF's `latents`. `checkpoint`: the
  `weight_map.Checkpoint` the state dict was read from, if any. Raises ValueError naming
  every resampler tensor missing (and, with a checkpoint, its directory and the file it was
  expected in), unused or mis-shaped.
  """
  arrays = {key: weight_map.to_numpy(value) for key, value in state_dict.items()
            if key.startswith(prefix)}
  weight_map.check_present(arrays, [f'{prefix}latents'], checkpoint,
                           why=f' (is prefix={prefix!r} right?)')
  width = arrays[f'{prefix}latents'].shape[-1]
  stacked = ('transformer',) if weight_map.option(config, PerceiverResampler, 'scan') else ()
  flat = weight_map.to_ours(arrays, rules(config, prefix), expected_shapes(config, width),
                            stacked, checkpoint=checkpoint)
  return flax.traverse_util.unflatten_dict(flat, sep='/')
