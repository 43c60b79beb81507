"""open_clip `ModifiedResNet` (CLIP's ResNet image tower) <-> `mmjax.models.resnet`, both ways.

    config = dict(layers=(3, 4, 6, 3), width=64, heads=32, output_dim=1024, image_size=224)
    params = params_from_open_clip(model.visual.state_dict(), config)
    ModifiedResNet(**config).apply({'params': params}, images_nhwc)
    state_dict = params_to_open_clip(params, config)  # numpy arrays, open_clip's names

Our param tree keeps open_clip's names except: `bn{k}` -> `norm{k}` (with `weight`, `bias`,
`running_mean`, `running_var` -> `scale`, `bias`, `mean`, `var`), `layer{i}.{j}` ->
`layer{i}_{j}`, a block's `downsample.0` / `.1` -> `downsample_conv` / `downsample_norm`,
the attention pool's `q_proj`, `k_proj`, `v_proj`, `c_proj` -> `query`, `key`, `value`,
`out` (kernels split into heads as `layers.Attention` keeps them) and
`positional_embedding` -> `pos_embed`. BatchNorm's `num_batches_tracked` counters are
ignored on import and not written on export. A whole open_clip CLIP's state dict can be
given with `prefix='visual.'`: keys outside the prefix are ignored.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert import weight_map
from mmjax.models import resnet


def _batch_norm(torch_prefix: str, path: str) -> list[weight_map.Rule]:
  """torch `BatchNorm2d` <-> our `resnet.BatchNorm` (`scale`, `bias`, `mean`, `var`)."""
  return [weight_map.one(f'{torch_prefix}.{name}', f'{path}/{ours}') for name, ours in (
      ('weight', 'scale'), ('bias', 'bias'), ('running_mean', 'mean'), ('running_var', 'var'))]


def _attention_pool(torch_prefix: str, path: str, heads: int) -> list[weight_map.Rule]:
  """open_clip `AttentionPool2d` <-> our `resnet.AttentionPool2d`."""
  rules = [weight_map.one(f'{torch_prefix}.positional_embedding', f'{path}/pos_embed')]
  for name, ours in (('q_proj', 'query'), ('k_proj', 'key'), ('v_proj', 'value')):
    rules += [
        weight_map.one(f'{torch_prefix}.{name}.weight', f'{path}/{ours}/kernel',  # [out, in]
                       lambda w: w.T.reshape(w.shape[1], heads, -1),
                       lambda k: k.reshape(k.shape[0], -1).T),
        weight_map.one(f'{torch_prefix}.{name}.bias', f'{path}/{ours}/bias',
                       lambda b: b.reshape(heads, -1), lambda b: b.reshape(-1)),
    ]
  return rules + [
      weight_map.one(f'{torch_prefix}.c_proj.weight', f'{path}/out/kernel',  # [output_dim, in]
                     lambda w: w.T.reshape(heads, -1, w.shape[0]),
                     lambda k: k.reshape(-1, k.shape[-1]).T),
      weight_map.one(f'{torch_prefix}.c_proj.bias', f'{path}/out/bias'),
  ]


def rules(config: dict, prefix: str = '') -> list[weight_map.Rule]:
  """Every tensor of open_clip's `ModifiedResNet(**config)` (keys under `prefix`) and the
  param it becomes. Raises ValueError for `norm='group'`, which open_clip does not have."""
  if config.get('norm', 'batch') != 'batch':
    raise ValueError(f"open_clip's ModifiedResNet uses BatchNorm; got norm={config['norm']!r}")
  found = []
  for k in (1, 2, 3):
    found += weight_map.conv(f'{prefix}conv{k}', f'conv{k}', bias=False)
    found += _batch_norm(f'{prefix}bn{k}', f'norm{k}')
  for stage, blocks in enumerate(config['layers'], start=1):
    for j in range(blocks):
      torch_block, block = f'{prefix}layer{stage}.{j}', f'layer{stage}_{j}'
      for k in (1, 2, 3):
        found += weight_map.conv(f'{torch_block}.conv{k}', f'{block}/conv{k}', bias=False)
        found += _batch_norm(f'{torch_block}.bn{k}', f'{block}/norm{k}')
      if j == 0:  # stride 2 (stages 2-4) or 4x the channels (stage 1): a downsampling shortcut
        found += weight_map.conv(f'{torch_block}.downsample.0', f'{block}/downsample_conv',
                                 bias=False)
        found += _batch_norm(f'{torch_block}.downsample.1', f'{block}/downsample_norm')
  return found + _attention_pool(f'{prefix}attnpool', 'attnpool', config['heads'])


def _expected_shapes(config: dict) -> dict[str, tuple]:
  """`{path: shape}` of the params of `ModifiedResNet(**config)`."""
  size = config['image_size']
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  init = lambda rng, x: nn.unbox(resnet.ModifiedResNet(**config).init(rng, x))['params']
  shapes = jax.eval_shape(init, jax.random.key(0), images)
  return {path: leaf.shape
          for path, leaf in flax.traverse_util.flatten_dict(shapes, sep='/').items()}


def params_from_open_clip(state_dict, config: dict, *, prefix: str = '') -> dict:
  """open_clip `ModifiedResNet` `state_dict` (torch tensors or numpy) -> our float32 numpy
  params of `ModifiedResNet(**config)` (under `image_tower` in a `CLIP`), copied.

  Keys outside `prefix` and `num_batches_tracked` counters are ignored. Raises ValueError
  naming every tensor missing, unused or mis-shaped, and every param no tensor fills.
  """
  # Copies: numpy views of torch tensors would follow the model's in-place updates (a
  # train-mode forward moves its running statistics).
  arrays = {key: np.array(weight_map.to_numpy(value)) for key, value in state_dict.items()
            if key.startswith(prefix)}
  flat = weight_map.to_ours(arrays, rules(config, prefix), _expected_shapes(config),
                            ignore=lambda key: key.endswith('.num_batches_tracked'))
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def params_to_open_clip(params, config: dict, *, prefix: str = '') -> dict[str, np.ndarray]:
  """Our `ModifiedResNet` params (numpy or jax, boxed or not) -> open_clip `state_dict` as
  numpy arrays without `num_batches_tracked` (`load_state_dict(..., strict=False)` takes
  them after `torch.from_numpy`). Raises ValueError naming every param missing, unknown or
  mis-shaped."""
  flat = {path: np.asarray(value) for path, value
          in flax.traverse_util.flatten_dict(nn.unbox(params), sep='/').items()}
  return weight_map.to_hf(flat, rules(config, prefix), _expected_shapes(config))
