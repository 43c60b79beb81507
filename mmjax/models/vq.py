"""Chameleon's VQ image tokenizer (a VQGAN): conv encoder -> vector quantizer -> conv decoder.

  images [b, H, W, 3] in [-1, 1]
    --encoder--> [b, h, w, latent_channels] --quant_conv--> latents [b, h, w, code_dim]
    --quantize--> tokens [b, h*w] int32 (nearest code), codes [b, h, w, code_dim]
    --post_quant_conv--> [b, h, w, latent_channels] --decoder--> images [b, H, W, 3]

with h = H / 2**(len(channel_multiplier) - 1). The encoder is the layout of Hugging Face's
`ChameleonVQVAEEncoder` (taming-transformers' VQGAN encoder, as used by Make-a-Scene and
Chameleon), parameter for parameter, so its weights import (`mmjax.convert.hf_chameleon_vq`):
`conv_in`; per level `down_{i}`: `num_res_blocks` residual blocks (`block_{j}`, each followed
by self-attention `attn_{j}` when the level's resolution is in `attn_resolutions`), then a
stride-2 convolution (`downsample`, not on the last level); `mid` = block, attention, block;
GroupNorm (32 groups, eps 1e-6), swish, `conv_out`. Hugging Face has no decoder for Chameleon;
ours mirrors the encoder as taming's VQGAN decoder does: `conv_in`, `mid`, levels `up_{i}`
from the lowest resolution up with `num_res_blocks + 1` blocks each and a nearest-neighbour
x2 upsampling + conv, GroupNorm, swish, `conv_out` to RGB.

The quantizer (`quantize`) is a pure function of latents and codebook: nearest code,
straight-through gradient, codebook and commitment losses, optionally on l2-normalised
vectors (ViT-VQGAN; with a small `code_dim` these are its factorised codes). Codebook
updates that are not gradient steps (EMA codebook, restart of dead codes) are pure functions
too: `codebook_update` computes them from a batch inside the loss, `apply_codebook_update`
writes them into the params after the optimizer step (`mmjax.tasks.vq.VQTask.update_params`).

Parameters carry logical axis names: convolution kernels `[kh, kw, in, out]` split their
output channels on `embed` (-> fsdp), except the RGB output convolutions, which split their
input channels; the codebook is replicated.
"""

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype
_ACT = ('act_batch', None, None, None)  # activations [batch, h, w, channels]


def conv(features: int, kernel: int, *, stride: int = 1, padding='SAME',
         axes=(None, None, None, 'embed'), dtype: Dtype = jnp.float32, name=None) -> nn.Conv:
  """A 2-d convolution `[b, h, w, in] -> [b, h', w', features]` with named kernel axes."""
  return nn.Conv(
      features, (kernel, kernel), strides=stride, padding=padding, dtype=dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
      name=name)


def group_norm(groups: int, name=None) -> nn.GroupNorm:
  """torch `GroupNorm(groups, eps=1e-6)` over the channels, computed in float32."""
  return nn.GroupNorm(
      num_groups=groups, epsilon=1e-6, dtype=jnp.float32, use_fast_variance=False, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)))


def swish(x):
  return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
  """`x + conv2(swish(norm2(conv1(swish(norm1(x))))))`; a 1x1 `nin_shortcut` on x when the
  channel count changes. `[b, h, w, c] -> [b, h, w, out_channels]`."""
  out_channels: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv3 = functools.partial(conv, self.out_channels, 3, padding=((1, 1), (1, 1)),
                              dtype=self.dtype)
    h = swish(group_norm(self.norm_groups, 'norm1')(x)).astype(self.dtype)
    h = conv3(name='conv1')(h)
    h = swish(group_norm(self.norm_groups, 'norm2')(h)).astype(self.dtype)
    h = conv3(name='conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, dtype=self.dtype, name='nin_shortcut')(x)
    return nn.with_logical_constraint(x + h, _ACT)


class AttnBlock(nn.Module):
  """Single-head self-attention over the h*w positions, 1x1 convs for q, k, v, proj_out,
  scaled by channels**-0.5, residual. `[b, h, w, c] -> [b, h, w, c]`."""
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = group_norm(self.norm_groups, 'norm')(x).astype(self.dtype)
    project = lambda name: conv(channels, 1, dtype=self.dtype, name=name)(h).reshape(
        batch, height * width, channels)
    q, k, v = project('q'), project('k'), project('v')
    logits = jnp.einsum('bqc,bkc->bqk', q, k).astype(jnp.float32) * channels ** -0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bqk,bkc->bqc', weights, v).reshape(batch, height, width, channels)
    return nn.with_logical_constraint(
        x + conv(channels, 1, dtype=self.dtype, name='proj_out')(out), _ACT)


class Downsample(nn.Module):
  """Zero-pad bottom and right by one, 3x3 conv with stride 2 (torch's asymmetric padding)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(x.shape[-1], 3, stride=2, padding='VALID', dtype=self.dtype, name='conv')(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(x.shape[-1], 3, padding=((1, 1), (1, 1)), dtype=self.dtype, name='conv')(x)


class Level(nn.Module):
  """One resolution: `num_blocks` ResnetBlocks (`block_{j}`), each followed by an AttnBlock
  (`attn_{j}`) if `attention`, then `resample` (`downsample` | `upsample` | None)."""
  out_channels: int
  num_blocks: int
  attention: bool
  resample: str | None
  norm_groups: int = 32
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    block_class = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    for j in range(self.num_blocks):
      x = block_class(self.out_channels, self.norm_groups, self.dtype, name=f'block_{j}')(x)
      if self.attention:
        x = AttnBlock(self.norm_groups, self.dtype, name=f'attn_{j}')(x)
    if self.resample == 'downsample':
      x = Downsample(self.dtype, name='downsample')(x)
    elif self.resample == 'upsample':
      x = Upsample(self.dtype, name='upsample')(x)
    return x


class Middle(nn.Module):
  """`block_1`, `attn_1` (if `attention`), `block_2` at the lowest resolution."""
  norm_groups: int = 32
  attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.norm_groups, self.dtype, name='block_1')(x)
    if self.attention:
      x = AttnBlock(self.norm_groups, self.dtype, name='attn_1')(x)
    return ResnetBlock(channels, self.norm_groups, self.dtype, name='block_2')(x)


class Encoder(nn.Module):
  """`[b, H, W, 3] -> [b, H/f, W/f, latent_channels]`, f = 2**(len(channel_multiplier) - 1).

  Level i has `base_channels * channel_multiplier[i]` channels; attention follows each of
  its blocks when its resolution (`resolution / 2**i`) is in `attn_resolutions`.
  """
  base_channels: int
  channel_multiplier: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  resolution: int
  latent_channels: int
  mid_attention: bool = True
  norm_groups: int = 32
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = nn.with_logical_constraint(images.astype(self.dtype), _ACT)
    x = conv(self.base_channels, 3, padding=((1, 1), (1, 1)), dtype=self.dtype,
             name='conv_in')(x)
    levels = len(self.channel_multiplier)
    for i, multiplier in enumerate(self.channel_multiplier):
      x = Level(self.base_channels * multiplier, self.num_res_blocks,
                attention=self.resolution // 2 ** i in self.attn_resolutions,
                resample='downsample' if i < levels - 1 else None,
                norm_groups=self.norm_groups, remat=self.remat, dtype=self.dtype,
                name=f'down_{i}')(x)
    x = Middle(self.norm_groups, self.mid_attention, self.dtype, name='mid')(x)
    x = swish(group_norm(self.norm_groups, 'norm_out')(x)).astype(self.dtype)
    return conv(self.latent_channels, 3, padding=((1, 1), (1, 1)), dtype=self.dtype,
                name='conv_out')(x)


class Decoder(nn.Module):
  """`[b, h, w, latent_channels] -> [b, h*f, w*f, out_channels]`: the encoder mirrored."""
  base_channels: int
  channel_multiplier: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  resolution: int
  mid_attention: bool = True
  out_channels: int = 3
  norm_groups: int = 32
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, latents):
    levels = len(self.channel_multiplier)
    x = nn.with_logical_constraint(latents.astype(self.dtype), _ACT)
    x = conv(self.base_channels * self.channel_multiplier[-1], 3, padding=((1, 1), (1, 1)),
             dtype=self.dtype, name='conv_in')(x)
    x = Middle(self.norm_groups, self.mid_attention, self.dtype, name='mid')(x)
    for i in reversed(range(levels)):
      x = Level(self.base_channels * self.channel_multiplier[i], self.num_res_blocks + 1,
                attention=self.resolution // 2 ** i in self.attn_resolutions,
                resample='upsample' if i > 0 else None,
                norm_groups=self.norm_groups, remat=self.remat, dtype=self.dtype,
                name=f'up_{i}')(x)
    x = swish(group_norm(self.norm_groups, 'norm_out')(x)).astype(self.dtype)
    return conv(self.out_channels, 3, padding=((1, 1), (1, 1)), axes=(None, None, 'embed', None),
                dtype=self.dtype, name='conv_out')(x).astype(jnp.float32)


class Quantized(NamedTuple):
  """What `quantize` returns (float32; `...` = the latents' leading axes)."""
  quantized: jax.Array  # [..., d] codes, straight-through: gradient flows to the latents
  tokens: jax.Array  # int32 [...] index of the nearest code
  codebook_loss: jax.Array  # mean |sg(z) - e|^2: moves the codes only
  commitment_loss: jax.Array  # mean |z - sg(e)|^2: moves the encoder only
  latents: jax.Array  # [..., d] z as compared with the codes (l2-normalised if asked)


def l2_normalize(x, eps: float = 1e-6):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps ** 2))


def nearest_codes(latents, codebook):
  """`[..., d]`, `[K, d]` -> int32 `[...]`: argmin_k |z - e_k|^2, computed as
  |z|^2 + |e|^2 - 2 z.e (as Hugging Face / taming do, so ties break alike)."""
  flat = latents.reshape(-1, latents.shape[-1])
  distances = (jnp.sum(jnp.square(flat), 1, keepdims=True) + jnp.sum(jnp.square(codebook), 1)
               - 2 * jnp.einsum('nd,kd->nk', flat, codebook))
  distances = nn.with_logical_constraint(distances, ('act_batch', None))
  return jnp.argmin(distances, axis=1).astype(jnp.int32).reshape(latents.shape[:-1])


@functools.partial(jax.jit, static_argnames=('normalize',))
def quantize(latents, codebook, *, normalize: bool = False) -> Quantized:
  """Vector quantization of `latents [..., d]` with `codebook [K, d]` (VQ-VAE).

  quantized = z + sg(e - z): its value is the nearest code e, its gradient the identity to z
  (straight-through). The losses are means over all elements, unweighted: training uses
  `codebook_loss + beta * commitment_loss` (beta = 0.25). `normalize` l2-normalises latents
  and codes first (ViT-VQGAN): the nearest code is then the one of highest cosine.
  """
  z = latents.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  if normalize:
    z, codebook = l2_normalize(z), l2_normalize(codebook)
  tokens = nearest_codes(z, codebook)
  codes = jnp.take(codebook, tokens, axis=0)
  sg = jax.lax.stop_gradient
  return Quantized(
      quantized=z + sg(codes - z), tokens=tokens,
      codebook_loss=jnp.mean(jnp.square(sg(z) - codes)),
      commitment_loss=jnp.mean(jnp.square(z - sg(codes))),
      latents=z)


def code_histogram(tokens, num_codes: int):
  """Fraction of the tokens `[...]` assigned to each code: `[num_codes]`, sums to 1."""
  counts = jnp.zeros((num_codes,), jnp.float32).at[tokens.reshape(-1)].add(1.0)
  return counts / tokens.size


def perplexity(histogram):
  """exp(entropy) of a code-usage distribution: the effective number of codes used."""
  p = histogram / jnp.maximum(jnp.sum(histogram), 1e-12)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def codebook_update(quantizer_params, latents, tokens, rng, *, decay: float,
                    restart_threshold: float, ema: bool) -> dict:
  """One batch's non-gradient codebook update, to pass to `apply_codebook_update`.

  latents `[..., d]` as quantized (`Quantized.latents`), tokens `[...]`. Returns float32:
    usage `[K]`: EMA of the fraction of tokens per code, `decay * usage + (1 - decay) * p`;
    ema_sum `[K, d]` (if `ema`): EMA of the per-token mean of the latents assigned to each
      code (VQ-VAE-2's EMA codebook; the code is `ema_sum / usage`);
    restart `[K]`: 1 for a dead code (usage below `restart_threshold / K` before this batch);
    restart_codes `[K, d]`: a random latent of the batch for each code, its new value if dead.
  Everything is linear in the batch (means over its tokens), so averaging the updates of
  equal micro-batches gives the whole batch's; for `restart_codes` that average is a mean
  of random latents (exact without gradient accumulation).
  """
  num_codes = quantizer_params['usage'].shape[0]
  flat = latents.reshape(-1, latents.shape[-1]).astype(jnp.float32)
  tokens = tokens.reshape(-1)
  histogram = code_histogram(tokens, num_codes)
  update = {'usage': decay * quantizer_params['usage'] + (1 - decay) * histogram}
  if ema:
    sums = jnp.zeros((num_codes, flat.shape[-1]), jnp.float32).at[tokens].add(flat)
    update['ema_sum'] = (decay * quantizer_params['ema_sum']
                         + (1 - decay) * sums / tokens.shape[0])
  dead = quantizer_params['usage'] < restart_threshold / num_codes
  update['restart'] = dead.astype(jnp.float32)
  picks = jax.random.randint(rng, (num_codes,), 0, flat.shape[0])
  update['restart_codes'] = jnp.take(flat, picks, axis=0)
  return update


def apply_codebook_update(quantizer_params, update, *, ema: bool, epsilon: float = 1e-7):
  """Quantizer params after `codebook_update`: new usage; dead codes moved onto batch
  latents with usage reset to the uniform 1/K; with `ema`, codebook = ema_sum / usage
  (usage Laplace-smoothed by `epsilon` per code, as in Sonnet's VectorQuantizerEMA).

  Returns `(params, metrics)`; all leaves are replaced, so optimizer updates of the
  non-gradient leaves (weight decay) do not persist.
  """
  codebook = quantizer_params['codebook']
  num_codes = codebook.shape[0]
  restart = update['restart'] > 0
  usage = jnp.where(restart, 1.0 / num_codes, update['usage'])
  new = dict(quantizer_params, usage=usage)
  if ema:
    ema_sum = jnp.where(restart[:, None], update['restart_codes'] / num_codes,
                        update['ema_sum'])
    total = jnp.sum(usage)
    smoothed = (usage + epsilon) / (total + num_codes * epsilon) * total
    new.update(ema_sum=ema_sum, codebook=ema_sum / smoothed[:, None])
  else:
    new['codebook'] = jnp.where(restart[:, None], update['restart_codes'], codebook)
  return new, {'codes_restarted': jnp.sum(restart.astype(jnp.float32))}


class Codebook(nn.Module):
  """The codebook `[num_codes, code_dim]` (uniform in +-1/K, as taming's) and, with
  `restart_dead_codes` or `ema`, the usage EMA `[num_codes]`, and with `ema` the EMA sums
  `[num_codes, code_dim]` (codebook * usage). Returns them as a dict.

  With restarts the usage starts at 0: every code is dead, so the first training step puts
  each on a random latent of the first batch (a data-dependent initialisation). Without
  them it starts at the uniform share 1/K.
  """
  num_codes: int
  code_dim: int
  restart_dead_codes: bool = False
  ema: bool = False

  @nn.compact
  def __call__(self):
    scale = 1.0 / self.num_codes
    init = lambda rng, shape: jax.random.uniform(rng, shape, jnp.float32, -scale, scale)
    codebook = self.param('codebook', nn.with_logical_partitioning(init, (None, None)),
                          (self.num_codes, self.code_dim))
    params = {'codebook': codebook}
    if self.restart_dead_codes or self.ema:
      usage = 0.0 if self.restart_dead_codes else scale
      params['usage'] = self.param(
          'usage', nn.with_logical_partitioning(nn.initializers.constant(usage), (None,)),
          (self.num_codes,))
    if self.ema:
      params['ema_sum'] = self.param(
          'ema_sum', nn.with_logical_partitioning(
              lambda rng: codebook * params['usage'][:, None], (None, None)))
    return params


class VQModel(nn.Module):
  """The tokenizer: `encode`, `quantize`, `decode`, `tokenize`, `detokenize`; calling it
  runs all of them and returns a dict (`reconstruction`, `quantized`: `Quantized`).

  Param tree: `encoder`, `quant_conv`, `quantizer` (`codebook`, optional `usage`, `ema_sum`:
  see `Codebook`), `post_quant_conv`, `decoder`. Field names follow `ChameleonVQVAEConfig`
  except `num_codes` (HF `num_embeddings`) and `code_dim` (HF `embed_dim`).
  """
  base_channels: int = 128
  channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = ()
  mid_attention: bool = True
  resolution: int = 512
  latent_channels: int = 256
  num_codes: int = 8192
  code_dim: int = 256
  norm_groups: int = 32
  l2_normalize: bool = False
  restart_dead_codes: bool = False
  ema: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    shape = dict(base_channels=self.base_channels,
                 channel_multiplier=tuple(self.channel_multiplier),
                 num_res_blocks=self.num_res_blocks,
                 attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                 mid_attention=self.mid_attention, norm_groups=self.norm_groups,
                 remat=self.remat, dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **shape)
    self.quant_conv = conv(self.code_dim, 1, dtype=self.dtype)
    self.quantizer = Codebook(self.num_codes, self.code_dim, self.restart_dead_codes, self.ema)
    self.post_quant_conv = conv(self.latent_channels, 1, dtype=self.dtype)
    self.decoder = Decoder(**shape)

  def encode(self, images):
    """`[b, H, W, 3]` in [-1, 1] -> continuous latents `[b, h, w, code_dim]` (float32)."""
    return self.quant_conv(self.encoder(images)).astype(jnp.float32)

  def quantize(self, latents) -> Quantized:
    """`[b, h, w, code_dim]` -> `Quantized` with tokens `[b, h*w]`."""
    result = quantize(latents, self.quantizer()['codebook'], normalize=self.l2_normalize)
    return result._replace(tokens=result.tokens.reshape(latents.shape[0], -1))

  def decode(self, codes):
    """`[b, h, w, code_dim]` (quantized) -> images `[b, H, W, 3]`, about [-1, 1]."""
    return self.decoder(self.post_quant_conv(codes.astype(self.dtype)))

  def tokenize(self, images):
    """`[b, H, W, 3]` -> int32 tokens `[b, h*w]` (row-major over the latent grid)."""
    return self.quantize(self.encode(images)).tokens

  def lookup(self, tokens, grid: tuple[int, int] | None = None):
    """int32 `[b, h*w]` -> codes `[b, h, w, code_dim]` (l2-normalised if the codes are);
    `grid` = (h, w), square by default."""
    codebook = self.quantizer()['codebook'].astype(jnp.float32)
    if self.l2_normalize:
      codebook = l2_normalize(codebook)
    if grid is None:
      side = math.isqrt(tokens.shape[1])
      if side * side != tokens.shape[1]:
        raise ValueError(f'{tokens.shape[1]} tokens are not a square grid; pass grid=(h, w)')
      grid = (side, side)
    return jnp.take(codebook, tokens, axis=0).reshape(tokens.shape[0], *grid, -1)

  def detokenize(self, tokens, grid: tuple[int, int] | None = None):
    """int32 `[b, h*w]` -> images `[b, H, W, 3]`."""
    return self.decode(self.lookup(tokens, grid))

  def __call__(self, images):
    quantized = self.quantize(self.encode(images))
    return {'reconstruction': self.decode(quantized.quantized), 'quantized': quantized}


class PatchDiscriminator(nn.Module):
  """PatchGAN (pix2pix / taming's NLayerDiscriminator) with GroupNorm instead of BatchNorm:
  `[b, H, W, 3]` -> one logit per overlapping patch `[b, h', w', 1]`."""
  channels: int = 64
  num_layers: int = 3
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    leaky = lambda x: nn.leaky_relu(x, 0.2)
    pad = ((1, 1), (1, 1))
    x = conv(self.channels, 4, stride=2, padding=pad, dtype=self.dtype, name='conv_0')(
        images.astype(self.dtype))
    x = leaky(x)
    for n in range(1, self.num_layers + 1):
      features = self.channels * min(2 ** n, 8)
      stride = 2 if n < self.num_layers else 1
      x = conv(features, 4, stride=stride, padding=pad, dtype=self.dtype, name=f'conv_{n}')(x)
      x = leaky(group_norm(self.norm_groups, f'norm_{n}')(x)).astype(self.dtype)
    return conv(1, 4, padding=pad, axes=(None, None, 'embed', None), dtype=self.dtype,
                name='logits')(x).astype(jnp.float32)
