"""Hugging Face `transformers` ChameleonVQVAE <-> `mmjax.models.vq.VQModel`, both ways.

    kwargs = config_from_hf(hf_model.config)              # VQModel(**kwargs)
    params = params_from_hf(hf_model.state_dict(), kwargs)  # numpy, full VQModel tree
    VQModel(**kwargs).apply({'params': params}, images_nhwc, method='tokenize')
    state_dict = params_to_hf(params, kwargs)               # numpy arrays, HF names

HF's ChameleonVQVAE holds the encoder, `quant_conv`, the quantizer's codebook
(`quantize.embedding.weight [num_embeddings, embed_dim]`) and `post_quant_conv`; it has no
decoder. Imported params take those tensors (torch NCHW conv weights `[out, in, kh, kw]`
become flax `[kh, kw, in, out]`; GroupNorm `weight` becomes `scale`); the decoder (and the
usage statistics, if the model keeps them) come from `base_params` (e.g. a trained
checkpoint or `VQModel.init`), a fresh seeded init by default, with `usage` reset to the
uniform 1/K and `ema_sum` to codebook/K.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert import weight_map
from mmjax.models.vq import VQModel

_IMPORTED = ('encoder/', 'quant_conv/', 'quantizer/codebook', 'post_quant_conv/')


def config_from_hf(hf_config, **overrides) -> dict:
  """`transformers.ChameleonVQVAEConfig` -> kwargs for `VQModel(...)` (HF GroupNorm: 32)."""
  if hf_config.double_latent:
    raise ValueError('double_latent=True gives 2 * latent_channels encoder outputs, which '
                     "HF's own quant_conv cannot take; only double_latent=False is supported")
  if hf_config.in_channels != 3:
    raise ValueError(f'in_channels={hf_config.in_channels}; only RGB (3) is supported')
  vanilla = hf_config.attn_type == 'vanilla'
  return dict(
      base_channels=hf_config.base_channels,
      channel_multiplier=tuple(hf_config.channel_multiplier),
      num_res_blocks=hf_config.num_res_blocks,
      attn_resolutions=tuple(hf_config.attn_resolutions or ()) if vanilla else (),
      mid_attention=vanilla,
      resolution=hf_config.resolution,
      latent_channels=hf_config.latent_channels,
      num_codes=hf_config.num_embeddings,
      code_dim=hf_config.embed_dim,
      norm_groups=32,
      **overrides)


def _resnet(hf: str, ours: str, has_shortcut: bool) -> list[weight_map.Rule]:
  rules = [*weight_map.layer_norm(f'{hf}.norm1', f'{ours}/norm1'),
           *weight_map.conv(f'{hf}.conv1', f'{ours}/conv1', bias=True),
           *weight_map.layer_norm(f'{hf}.norm2', f'{ours}/norm2'),
           *weight_map.conv(f'{hf}.conv2', f'{ours}/conv2', bias=True)]
  if has_shortcut:
    rules += weight_map.conv(f'{hf}.nin_shortcut', f'{ours}/nin_shortcut', bias=True)
  return rules


def _attention(hf: str, ours: str) -> list[weight_map.Rule]:
  rules = weight_map.layer_norm(f'{hf}.norm', f'{ours}/norm')
  for name in ('q', 'k', 'v', 'proj_out'):
    rules += weight_map.conv(f'{hf}.{name}', f'{ours}/{name}', bias=True)
  return rules


def rules(config: dict) -> list[weight_map.Rule]:
  """Every ChameleonVQVAE tensor and the param it becomes (GroupNorm uses LayerNorm's
  weight/bias <-> scale/bias rule)."""
  base, multipliers = config['base_channels'], tuple(config['channel_multiplier'])
  resolution, attn = config['resolution'], tuple(config['attn_resolutions'])
  out = weight_map.conv('encoder.conv_in', 'encoder/conv_in', bias=True)
  channels = base
  for i, multiplier in enumerate(multipliers):
    for j in range(config['num_res_blocks']):
      hf, ours = f'encoder.down.{i}', f'encoder/down_{i}'
      out += _resnet(f'{hf}.block.{j}', f'{ours}/block_{j}', channels != base * multiplier)
      channels = base * multiplier
      if resolution // 2 ** i in attn:
        out += _attention(f'{hf}.attn.{j}', f'{ours}/attn_{j}')
    if i < len(multipliers) - 1:
      out += weight_map.conv(f'encoder.down.{i}.downsample.conv',
                             f'encoder/down_{i}/downsample/conv', bias=True)
  out += _resnet('encoder.mid.block_1', 'encoder/mid/block_1', False)
  if weight_map.option(config, VQModel, 'mid_attention'):
    out += _attention('encoder.mid.attn_1', 'encoder/mid/attn_1')
  out += _resnet('encoder.mid.block_2', 'encoder/mid/block_2', False)
  out += weight_map.layer_norm('encoder.norm_out', 'encoder/norm_out')
  out += weight_map.conv('encoder.conv_out', 'encoder/conv_out', bias=True)
  out += weight_map.conv('quant_conv', 'quant_conv', bias=True)
  out += [weight_map.one('quantize.embedding.weight', 'quantizer/codebook')]
  out += weight_map.conv('post_quant_conv', 'post_quant_conv', bias=True)
  return out


def _init(config: dict, seed: int = 0):
  model = VQModel(**config)
  images = jnp.zeros((1, config['resolution'], config['resolution'], 3), jnp.float32)
  return nn.unbox(model.init(jax.random.key(seed), images))['params']


def _flat(params) -> dict:
  return flax.traverse_util.flatten_dict(nn.unbox(params), sep='/')


def _expected_shapes(config: dict) -> tuple[dict, dict]:
  """`({imported path: shape}, {every path: shape})` of VQModel's params."""
  shapes = jax.eval_shape(lambda: _init(config))
  every = {path: leaf.shape for path, leaf in _flat(shapes).items()}
  return {path: shape for path, shape in every.items() if path.startswith(_IMPORTED)}, every


def params_from_hf(state_dict, config: dict, base_params=None, *, checkpoint=None) -> dict:
  """HF ChameleonVQVAE `state_dict` (torch tensors or numpy) -> float32 numpy params of
  `VQModel(**config)`; the decoder from `base_params` (default: init with seed 0).

  `checkpoint`: the `weight_map.Checkpoint` the state dict was read from, if any. Raises
  ValueError naming every HF key missing (and, with a checkpoint, its directory and the
  file the key was expected in), unused or mis-shaped.
  """
  arrays = {key: weight_map.to_numpy(value) for key, value in state_dict.items()}
  imported_shapes, every = _expected_shapes(config)
  imported = weight_map.to_ours(arrays, rules(config), imported_shapes, checkpoint=checkpoint)
  base = _flat(base_params) if base_params is not None else _flat(_init(config))
  missing = sorted(set(every) - set(base) - set(imported))
  if missing:
    raise ValueError(f'base_params lack {missing}')
  flat = {path: np.asarray(base[path], np.float32) for path in every}
  flat.update(imported)
  codebook = flat['quantizer/codebook']
  if 'quantizer/usage' in flat:
    flat['quantizer/usage'] = np.full(codebook.shape[:1], 1 / codebook.shape[0], np.float32)
  if 'quantizer/ema_sum' in flat:
    flat['quantizer/ema_sum'] = codebook / codebook.shape[0]
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def params_to_hf(params, config: dict) -> dict[str, np.ndarray]:
  """Our params (numpy or jax, boxed or not; the decoder is dropped) -> `{HF key: array}`."""
  imported_shapes, _ = _expected_shapes(config)
  flat = {path: np.asarray(value) for path, value in _flat(params).items()
          if path.startswith(_IMPORTED)}
  return weight_map.to_hf(flat, rules(config), imported_shapes)
