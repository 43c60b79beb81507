"""VQ image tokenizer task (Chameleon's VQGAN): reconstruct images through discrete codes.

loss = pixel_weight * |x - x_hat|  (L1, or L2 with `config.loss.pixel='l2'`)
     + codebook_weight * codebook_loss + beta * commitment_loss         (VQ-VAE; beta 0.25)
     [+ gan_weight * hinge generator loss + hinge discriminator loss]   (`gan_weight > 0`)

Codebook state that is not learned by gradient lives in the params tree, under
`quantizer/`: `usage` (EMA of each code's share of the tokens) when dead codes are
restarted or the codebook is an EMA, and `ema_sum` for the EMA codebook
(`config.quantizer.ema`, whose codebook gets no gradient and no codebook loss). The loss
computes the new values from its batch (`mmjax.models.vq.codebook_update`) and returns
them in its aux output; `update_params`, which the Trainer calls after the optimizer step,
writes them in. They are checkpointed and sharded like any param.

The optional patch-GAN discriminator (`params['discriminator']`) trains in the same
single backward pass: its loss sees the reconstructions through a stop-gradient, the
generator term sees the discriminator's params through one, so each side's gradient only
reaches its own params. `params['gan_steps']`, a step counter kept by `update_params`,
switches the GAN terms on after `config.loss.gan_start` steps.
"""

import jax
import jax.numpy as jnp

from mmjax import config_lib
from mmjax import losses
from mmjax.data import pipeline
from mmjax.evals import capabilities
from mmjax.models import vq
from mmjax.tasks.base import Task

PIXEL_LOSSES = ('l1', 'l2')


def model_kwargs(config) -> dict:
  """`VQModel(...)` kwargs from `config.model`, `config.quantizer` and the image size."""
  model, quantizer = config.model, config.quantizer
  return dict(
      base_channels=model.base_channels,
      channel_multiplier=tuple(model.channel_multiplier),
      num_res_blocks=model.num_res_blocks,
      attn_resolutions=tuple(model.attn_resolutions),
      mid_attention=model.mid_attention,
      resolution=config.data.image_size,
      latent_channels=model.latent_channels,
      num_codes=model.num_codes,
      code_dim=model.code_dim,
      norm_groups=model.norm_groups,
      l2_normalize=quantizer.l2_normalize,
      restart_dead_codes=quantizer.restart_threshold > 0,
      ema=quantizer.ema,
      remat=model.remat)


def build_model(config) -> vq.VQModel:
  return vq.VQModel(**model_kwargs(config), dtype=jnp.dtype(config.compute_dtype))


def build_discriminator(config) -> vq.PatchDiscriminator:
  return vq.PatchDiscriminator(**config.loss.discriminator,
                               dtype=jnp.dtype(config.compute_dtype))


def psnr_from_mse(mse, peak_to_peak: float = 2.0):
  """PSNR in dB of images whose values span `peak_to_peak` ([-1, 1]: 2)."""
  return 10.0 * jnp.log10(peak_to_peak ** 2 / jnp.maximum(mse, 1e-12))


class VQTask(Task):
  """Images -> tokens -> images; `tokenize`/`detokenize` for the early-fusion families."""

  def __init__(self, config):
    super().__init__(config)
    self.model = build_model(config)
    self.gan = config.loss.gan_weight > 0
    self.discriminator = build_discriminator(config) if self.gan else None
    self.data_dir = config_lib.data_dir(config)

  @classmethod
  def validate_config(cls, config):
    if config.data.name not in pipeline.DATASETS:
      raise ValueError(f'config.data.name={config.data.name!r} is not a dataset; use one of '
                       f'{pipeline.DATASETS}')
    model, quantizer, loss = config.model, config.quantizer, config.loss
    levels = len(model.channel_multiplier)
    if levels < 1:
      raise ValueError('config.model.channel_multiplier is empty')
    factor = 2 ** (levels - 1)
    if config.data.image_size % factor:
      raise ValueError(
          f'config.data.image_size={config.data.image_size} is not divisible by the '
          f'down-sampling factor {factor} of config.model.channel_multiplier='
          f'{tuple(model.channel_multiplier)}')
    channels = {'config.model.base_channels * channel_multiplier[{}]'.format(i):
                model.base_channels * m for i, m in enumerate(model.channel_multiplier)}
    for name, value in channels.items():
      if value % model.norm_groups:
        raise ValueError(f'{name}={value} is not divisible by config.model.norm_groups='
                         f'{model.norm_groups}')
    if loss.pixel not in PIXEL_LOSSES:
      raise ValueError(f'config.loss.pixel={loss.pixel!r}; use one of {PIXEL_LOSSES}')
    if not 0 <= quantizer.decay < 1:
      raise ValueError(f'config.quantizer.decay={quantizer.decay} must be in [0, 1)')
    if quantizer.restart_threshold < 0 or quantizer.restart_threshold >= 1:
      raise ValueError(f'config.quantizer.restart_threshold={quantizer.restart_threshold} '
                       'must be in [0, 1) (a fraction of the uniform share 1/num_codes)')
    if loss.gan_weight < 0:
      raise ValueError(f'config.loss.gan_weight={loss.gan_weight} must be >= 0')
    if loss.gan_weight > 0:
      disc = loss.discriminator
      if disc.channels % disc.norm_groups:
        raise ValueError(f'config.loss.discriminator.channels={disc.channels} is not divisible '
                         f'by config.loss.discriminator.norm_groups={disc.norm_groups}')

  def batch_spec(self, batch_size):
    size = self.config.data.image_size
    return {'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)}

  def init(self, rng):
    model_rng, disc_rng = jax.random.split(rng)
    images = jnp.zeros(self.batch_spec(1)['image'].shape, jnp.float32)
    params = dict(self.model.init(model_rng, images)['params'])
    if self.gan:
      params['discriminator'] = self.discriminator.init(disc_rng, images)['params']
      params['gan_steps'] = jnp.zeros((), jnp.float32)
    return params

  @staticmethod
  def tokenizer_params(params) -> dict:
    """The VQModel's params (without the discriminator and its step counter)."""
    return {key: value for key, value in params.items()
            if key not in ('discriminator', 'gan_steps')}

  def loss(self, params, batch, rng):
    config = self.config
    images = batch['image']
    outputs = self.model.apply({'params': self.tokenizer_params(params)}, images)
    reconstruction, quantized = outputs['reconstruction'], outputs['quantized']
    pixel = losses.pixel_loss(reconstruction, images, config.loss.pixel)
    codebook_weight = 0.0 if config.quantizer.ema else config.loss.codebook_weight
    loss = (config.loss.pixel_weight * pixel + codebook_weight * quantized.codebook_loss
            + config.quantizer.beta * quantized.commitment_loss)
    histogram = vq.code_histogram(quantized.tokens, self.model.num_codes)
    mse = jnp.mean(jnp.square(reconstruction - images))
    metrics = {'pixel_loss': pixel, 'codebook_loss': quantized.codebook_loss,
               'commitment_loss': quantized.commitment_loss, 'psnr': psnr_from_mse(mse),
               'batch_codes_used': jnp.mean((histogram > 0).astype(jnp.float32)),
               'batch_perplexity': vq.perplexity(histogram)}
    if self.gan:
      gan_loss, gan_metrics = self._gan_loss(params, images, reconstruction)
      loss = loss + gan_loss
      metrics.update(gan_metrics)
    if self.model.restart_dead_codes or self.model.ema:
      metrics['codebook_update'] = vq.codebook_update(
          params['quantizer'], quantized.latents, quantized.tokens, rng,
          decay=config.quantizer.decay, restart_threshold=config.quantizer.restart_threshold,
          ema=self.model.ema)
    return loss, metrics

  def _gan_loss(self, params, images, reconstruction):
    """Hinge GAN terms; each reaches only its own side's params (see the module doc)."""
    sg = jax.lax.stop_gradient
    discriminate = lambda p, x: self.discriminator.apply({'params': p}, x)
    disc_params = params['discriminator']
    generator = losses.hinge_generator_loss(discriminate(sg(disc_params), reconstruction))
    real_and_fake = discriminate(disc_params, jnp.concatenate([images, sg(reconstruction)]))
    real, fake = jnp.split(real_and_fake, 2)
    discriminator = losses.hinge_discriminator_loss(real, fake)
    on = (params['gan_steps'] >= self.config.loss.gan_start).astype(jnp.float32)
    loss = on * (self.config.loss.gan_weight * generator + discriminator)
    return loss, {'gan_generator_loss': generator, 'gan_discriminator_loss': discriminator}

  def update_params(self, params, aux, trainable):
    aux = dict(aux)
    update = aux.pop('codebook_update', None)
    params = dict(params)
    # A frozen codebook (config.trainable) gets no EMA update and no dead-code restarts.
    if update is not None and trainable['quantizer']['codebook']:
      params['quantizer'], metrics = vq.apply_codebook_update(
          params['quantizer'], update, ema=self.model.ema,
          epsilon=self.config.quantizer.ema_epsilon)
      # Effective number of codes in recent use (perplexity of the usage EMA).
      aux.update(metrics, usage_perplexity=vq.perplexity(params['quantizer']['usage']))
    if self.gan:
      # No gradient and no weight decay (a scalar) reach it: the optimizer leaves it as is.
      params['gan_steps'] = params['gan_steps'] + 1
    return params, aux

  def train_iterator(self, *, process_index, process_count):
    data = self.config.data
    pipeline.build(data.name, self.data_dir)
    return pipeline.image_train_iterator(
        data.name, self.data_dir, image_size=data.image_size,
        global_batch_size=self.config.batch_size, seed=self.config.seed,
        process_index=process_index, process_count=process_count,
        worker_count=data.worker_count, augment=data.augment, jitter=data.jitter)

  def train_data_identity(self):
    name = self.config.data.name
    return {name: pipeline.dataset_identity(name, self.data_dir)}

  def _apply(self, params, inputs, method):
    return self.model.apply({'params': self.tokenizer_params(params)}, inputs, method=method)

  def encode(self, params, images):
    """`[b, H, W, 3]` in [-1, 1] -> continuous latents `[b, h, w, code_dim]`."""
    return self._apply(params, images, self.model.encode)

  def decode(self, params, codes):
    """Quantized latents `[b, h, w, code_dim]` -> images `[b, H, W, 3]`."""
    return self._apply(params, codes, self.model.decode)

  def tokenize(self, params, images):
    """`[b, H, W, 3]` in [-1, 1] -> int32 tokens `[b, h*w]`."""
    return self._apply(params, images, self.model.tokenize)

  def detokenize(self, params, tokens):
    """int32 tokens `[b, h*w]` -> images `[b, H, W, 3]`."""
    return self._apply(params, tokens, self.model.detokenize)

  def capabilities(self):
    return capabilities.Capabilities(image_tokenizer=capabilities.ImageTokenizer(
        tokenize=self.tokenize, detokenize=self.detokenize, num_codes=self.model.num_codes))

  def eval_data(self):
    return capabilities.EvalData(data_dir=self.data_dir, image_size=self.config.data.image_size,
                                 dataset=self.config.data.name)
