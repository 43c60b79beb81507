"""CLIP's ResNet image tower: open_clip's `ModifiedResNet` (OpenAI's RN50 family).

  images [b, H, W, 3]
    --stem: three 3x3 convs (the first stride 2), each norm + ReLU, 2x2 average pool-->
      [b, H/4, W/4, width]
    --layer1..layer4: Bottleneck stages (planes 1, 2, 4, 8 x width, outputs 4x planes;
      the last three halve the resolution)--> features [b, H/32, W/32, 32 * width]
    --attnpool: mean token + the H/32 * W/32 tokens, learned positions, multi-head attention
      whose only query is the mean token, projected to `output_dim`--> pooled [b, output_dim]

as open_clip/modified_resnet.py: ResNet-D style anti-aliased downsampling (a stride-2 block
average-pools after its 3x3 conv, and its shortcut average-pools before its 1x1 conv; every
conv has stride 1 except the stem's first), convolutions without bias, and zero-initialised
scale of each block's last norm (so a block starts as its shortcut). The param tree mirrors
open_clip's names (`conv1`, `norm1`, ..., `layer{i}_{j}` for `layer{i}.{j}`, `attnpool`), so
`mmjax.convert.open_clip_resnet` is a table of renames.

Normalisation (`norm`):
  'batch'  BatchNorm, as CLIP. Its running statistics are params (`mean`, `var`, next to
           `scale`, `bias`), as the VQ task keeps its EMA codebook: the train step has no
           mutable collection, and in the params tree they are checkpointed and sharded
           like any weight. They get no gradient (read through a stop-gradient, unused in
           training) and no weight decay (vectors), so the optimizer leaves them exactly
           as they are. `train=False` (evaluation, and torch's `eval()`) normalises with
           them; `train=True` (`mmjax.tasks.clip.ClipTask.loss`) normalises with the batch's
           moments (over the global batch under GSPMD: a synchronised BatchNorm), written to
           the `batch_stats` collection when it is mutable; the task passes them out of the
           loss and `update_batch_stats` folds them into the running statistics after the
           optimizer step (torch's update: momentum 0.1, unbiased variance).
  'group'  GroupNorm (`norm_groups` groups), which needs no state and no train flag: for
           training from scratch without batch statistics. Not importable from open_clip.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers

Dtype = jnp.dtype
NORMS = ('batch', 'group')
EXPANSION = 4  # a Bottleneck's output channels per `planes`
_ACT = ('act_batch', None, None, None)  # feature maps [batch, h, w, channels]


def _conv(features: int, kernel: int, *, stride: int = 1, dtype: Dtype, name: str) -> nn.Conv:
  """torch `Conv2d(kernel, stride, padding=kernel // 2, bias=False)`: `[b, h, w, in]` ->
  `[b, h / stride, w / stride, features]`; output channels on `embed` (as `mmjax.models.vq`)."""
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
      use_bias=False, dtype=dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               (None, None, None, 'embed')))


def _avg_pool(x, size: int):
  """torch `AvgPool2d(size)`: `[b, h, w, c]` -> `[b, h // size, w // size, c]` (1: identity)."""
  return x if size == 1 else nn.avg_pool(x, (size, size), strides=(size, size))


class BatchNorm(nn.Module):
  """BatchNorm over `[b, h, w, channels]` with its running statistics as params.

  Params `scale`, `bias`, `mean`, `var`, each `[channels]`, float32. `train=False`:
  `(x - mean) / sqrt(var + eps) * scale + bias` (torch `eval()`). `train=True`: the same
  with the batch's mean and (biased) variance over `b, h, w`; when the `batch_stats`
  collection is mutable, the batch mean and unbiased variance are put there (as `mean`,
  `var`) for `update_batch_stats`. Computed in float32, returned in the input dtype.
  """
  eps: float = 1e-5
  zero_scale: bool = False
  train: bool = False

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    param = lambda name, init: self.param(
        name, nn.with_logical_partitioning(init, ('embed',)), (channels,), jnp.float32)
    scale = param('scale', nn.initializers.zeros_init() if self.zero_scale
                  else nn.initializers.ones_init())
    bias = param('bias', nn.initializers.zeros_init())
    running_mean = param('mean', nn.initializers.zeros_init())
    running_var = param('var', nn.initializers.ones_init())
    x32 = x.astype(jnp.float32)
    if self.train:
      mean = jnp.mean(x32, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
      if self.is_mutable_collection('batch_stats'):
        count = x.shape[0] * x.shape[1] * x.shape[2]
        self.put_variable('batch_stats', 'mean', jax.lax.stop_gradient(mean))
        self.put_variable('batch_stats', 'var',
                          jax.lax.stop_gradient(var * count / max(count - 1, 1)))
    else:
      mean, var = jax.lax.stop_gradient(running_mean), jax.lax.stop_gradient(running_var)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(x.dtype)


def _norm(kind: str, groups: int, train: bool, name: str, zero_scale: bool = False):
  """The norm `kind` names ('batch' | 'group'), eps 1e-5 (torch's), computed in float32;
  `zero_scale` starts its scale at zero."""
  if kind == 'batch':
    return BatchNorm(zero_scale=zero_scale, train=train, name=name)
  if kind == 'group':
    return nn.GroupNorm(
        num_groups=groups, epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False, name=name,
        scale_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init() if zero_scale else nn.initializers.ones_init(),
            ('embed',)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)))
  raise ValueError(f'norm must be one of {NORMS}, got {kind!r}')


class Bottleneck(nn.Module):
  """`[b, h, w, in]` -> `[b, h / stride, w / stride, planes * 4]`: open_clip's `Bottleneck`.

  `relu(norm3(conv3(pool(relu(norm2(conv2(relu(norm1(conv1(x))))))))) + shortcut(x))`
  with 1x1 `conv1`, `conv3` and 3x3 `conv2`, `pool` a `stride` x `stride` average pool;
  `shortcut(x) = downsample_norm(downsample_conv(pool(x)))` when the stride or the channel
  count changes, else x. `norm3`'s scale starts at zero.
  """
  planes: int
  stride: int = 1
  norm: str = 'batch'
  norm_groups: int = 32
  train: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda features, kernel, name: _conv(features, kernel, dtype=self.dtype, name=name)
    norm = lambda name, h, zero_scale=False: _norm(
        self.norm, self.norm_groups, self.train, name, zero_scale)(h).astype(self.dtype)
    out_channels = self.planes * EXPANSION
    y = nn.relu(norm('norm1', conv(self.planes, 1, 'conv1')(x)))
    y = nn.relu(norm('norm2', conv(self.planes, 3, 'conv2')(y)))
    y = norm('norm3', conv(out_channels, 1, 'conv3')(_avg_pool(y, self.stride)), zero_scale=True)
    shortcut = x
    if self.stride > 1 or x.shape[-1] != out_channels:
      shortcut = norm('downsample_norm',
                      conv(out_channels, 1, 'downsample_conv')(_avg_pool(x, self.stride)))
    return nn.with_logical_constraint(nn.relu(y + shortcut), _ACT)


class AttentionPool2d(nn.Module):
  """`[b, h, w, channels]` -> `[b, output_dim]`: open_clip's `AttentionPool2d`.

  The `h * w` tokens, preceded by their mean, plus learned positions `pos_embed
  [h * w + 1, channels]`; multi-head attention (`query`, `key`, `value`, `out`, with
  biases, the kernels as `layers.Attention` lays them out) whose only query is the mean
  token and whose keys and values are all `h * w + 1` tokens; `out` maps the heads to
  `output_dim`. (`layers.Attention` projects back to its input width, so it cannot be
  used here.) Softmax in float32.
  """
  num_heads: int
  output_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    if channels % self.num_heads:
      raise ValueError(f'feature width {channels} is not divisible by heads {self.num_heads}')
    head_dim = channels // self.num_heads
    std = channels ** -0.5  # open_clip's init of the positions and of the four projections
    positions = self.param(
        'pos_embed', nn.with_logical_partitioning(nn.initializers.normal(std), ('length', 'embed')),
        (height * width + 1, channels))
    tokens = x.reshape(batch, height * width, channels)
    tokens = jnp.concatenate([jnp.mean(tokens, axis=1, keepdims=True), tokens], axis=1)
    tokens = tokens + positions.astype(self.dtype)
    init = lambda in_axis, out_axis: nn.initializers.normal(std)
    project_in = lambda name: layers.Dense(
        (self.num_heads, head_dim), ('embed', 'heads', 'kv'), kernel_init=init, dtype=self.dtype,
        name=name)
    q = project_in('query')(tokens[:, :1])
    k = project_in('key')(tokens)
    v = project_in('value')(tokens)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    out = layers.Dense(self.output_dim, ('heads', 'kv', 'embed'), in_dims=2, kernel_init=init,
                       dtype=self.dtype, name='out')(out)
    return out[:, 0]


class ModifiedResNet(nn.Module):
  """`[b, image_size, image_size, 3]` -> (pooled `[b, output_dim]`, tokens `[b, n, 32 * width]`).

  As `ViT.__call__` returns `(pooled, tokens)`: `tokens` are the last stage's feature map,
  `n = (image_size / 32) ** 2` positions in row-major order, before the attention pool
  (no positions added); `pooled` is the attention pool's output. Images are taken as given:
  the caller normalises them (mmjax's pipelines give [-1, 1]).

  Fields (open_clip's `ModifiedResNet(layers, output_dim, heads, image_size, width)`):
    layers       Bottleneck blocks of the four stages, e.g. (3, 4, 6, 3) for RN50.
    width        the stem's output channels; stage i has `width * 2 ** i` planes and
                 outputs 4x as many channels, so the features are `32 * width` wide.
    heads        heads of the attention pool (CLIP: `32 * width // 64`).
    output_dim   width of `pooled` (CLIP: the embedding width; it has no other projection).
    image_size   the input height and width, a multiple of 32 (it sizes `pos_embed`).
    norm         'batch' | 'group' (see the module docstring); `norm_groups` for 'group'.
    remat        a `layers.REMAT_POLICIES` name (or True / False) for each Bottleneck.

  `__call__(images, train=False)`: `train` only matters for `norm='batch'`.
  """
  layers: tuple[int, ...]
  width: int
  heads: int
  output_dim: int
  image_size: int
  norm: str = 'batch'
  norm_groups: int = 32
  remat: bool | str = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    if len(self.layers) != 4 or min(self.layers) < 1:
      raise ValueError(f'layers must be 4 positive block counts, got {self.layers!r}')
    if self.norm not in NORMS:
      raise ValueError(f'norm must be one of {NORMS}, got {self.norm!r}')
    if self.image_size % 32:
      raise ValueError(f'image_size {self.image_size} is not a multiple of 32')
    if images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f'images of shape {images.shape[1:]}; the ResNet takes '
                       f'{(self.image_size, self.image_size, 3)} (image_size {self.image_size})')
    norm = lambda name, h: _norm(self.norm, self.norm_groups, train, name)(h).astype(self.dtype)
    x = nn.with_logical_constraint(images.astype(self.dtype), _ACT)
    for i, features in enumerate((self.width // 2, self.width // 2, self.width)):
      x = _conv(features, 3, stride=2 if i == 0 else 1, dtype=self.dtype, name=f'conv{i + 1}')(x)
      x = nn.relu(norm(f'norm{i + 1}', x))
    x = nn.with_logical_constraint(_avg_pool(x, 2), _ACT)
    block = layers.remat_block(Bottleneck, self.remat, scan=False)
    for stage, blocks in enumerate(self.layers):
      for j in range(blocks):
        x = block(planes=self.width * 2 ** stage, stride=2 if stage and not j else 1,
                  norm=self.norm, norm_groups=self.norm_groups, train=train, dtype=self.dtype,
                  name=f'layer{stage + 1}_{j}')(x)
    pooled = AttentionPool2d(self.heads, self.output_dim, self.dtype, name='attnpool')(x)
    return pooled, x.reshape(x.shape[0], -1, x.shape[-1])


def update_batch_stats(params, batch_stats, momentum: float, trainable=None):
  """Folds a train step's BatchNorm moments into the running statistics in `params`.

  `batch_stats` is the `batch_stats` collection of a `train=True` apply (any nesting, e.g.
  `{'image_tower': {'norm1': {'mean', 'var'}, ...}}`), `params` the tree it came from;
  each `mean`/`var` param there becomes `(1 - momentum) * running + momentum * batch`
  (torch's BatchNorm update; `var` is the unbiased batch variance). `trainable` (a tree of
  bools over `params`, `mmjax.train.trainable_mask`) leaves the statistics it marks False
  unchanged. Returns the new params; the tree is otherwise untouched.
  """
  params = dict(params)
  for name, value in batch_stats.items():
    keep = trainable[name] if trainable is not None else None
    if hasattr(value, 'items'):
      params[name] = update_batch_stats(params[name], value, momentum, keep)
    elif keep is None or keep:
      params[name] = (1 - momentum) * params[name] + momentum * value
  return params
