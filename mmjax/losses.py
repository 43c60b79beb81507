"""Contrastive losses over the global batch.

Inputs are unit-norm embeddings `[batch, dim]` whose batch axis may be sharded over the
mesh. Under `jax.jit` the `[batch, batch]` logits are global: every image is contrasted
with every caption of the whole batch, not only those on its own device; the logits
stay sharded by rows (`act_batch`), so no device holds the full matrix.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def contrastive_logits(image_embeddings, text_embeddings, logit_scale, logit_bias=None):
  """`[b, d]`, `[b, d]` -> `[b, b]` image-to-text logits, row i = image i."""
  logits = jnp.einsum('id,td->it', image_embeddings.astype(jnp.float32),
                      text_embeddings.astype(jnp.float32)) * logit_scale
  if logit_bias is not None:
    logits = logits + logit_bias
  return nn.with_logical_constraint(logits, ('act_batch', None))


@jax.jit
def softmax_contrastive_loss(image_embeddings, text_embeddings, logit_scale):
  """CLIP's symmetric InfoNCE: mean of image->text and text->image cross-entropies."""
  logits = contrastive_logits(image_embeddings, text_embeddings, logit_scale)
  matching = jnp.diagonal(logits)
  image_to_text = jax.nn.logsumexp(logits, axis=1) - matching
  text_to_image = jax.nn.logsumexp(logits, axis=0) - matching
  return 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))


@jax.jit
def sigmoid_contrastive_loss(image_embeddings, text_embeddings, logit_scale, logit_bias):
  """SigLIP: `-sum(log_sigmoid(labels * logits)) / batch`, labels +1 on the diagonal, -1 off it."""
  logits = contrastive_logits(image_embeddings, text_embeddings, logit_scale, logit_bias)
  labels = 2.0 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


# VQ tokenizer losses (mmjax/tasks/vq.py); the quantizer's own losses are in mmjax/models/vq.py.

def pixel_loss(reconstruction, images, kind: str = 'l1'):
  """Mean absolute ('l1') or squared ('l2') error over every pixel and channel."""
  error = reconstruction.astype(jnp.float32) - images.astype(jnp.float32)
  if kind == 'l1':
    return jnp.mean(jnp.abs(error))
  if kind == 'l2':
    return jnp.mean(jnp.square(error))
  raise ValueError(f"pixel loss kind {kind!r}; use 'l1' or 'l2'")


def hinge_discriminator_loss(real_logits, fake_logits):
  """`(mean relu(1 - D(x)) + mean relu(1 + D(G(x)))) / 2` (VQGAN's discriminator loss)."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) +
                jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def hinge_generator_loss(fake_logits):
  """`-mean D(G(x))`: the generator's side of the hinge GAN."""
  return -jnp.mean(fake_logits)


# Language-model losses (the decoder families: LLaVA, Flamingo, Chameleon, ...).

def lm_cross_entropy(logits, targets, weights, z_loss: float = 0.0):
  """Weighted mean next-token cross-entropy plus PaLM's z-loss, in float32.

  `logits [b, l, vocab]`, `targets [b, l]` int, `weights [b, l]` (float or bool; 0 skips a
  token). Returns `(loss, metrics)`: loss = mean cross-entropy + `z_loss` * mean
  `logsumexp(logits)^2` over the weighted tokens; metrics 'cross_entropy', 'z_loss' (the
  term added to the loss), 'token_accuracy' (argmax == target) and 'num_tokens' (sum of
  weights). All are 0 when every weight is 0.
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  total = jnp.sum(weights)
  weighted_mean = lambda x: jnp.sum(weights * x) / jnp.where(total > 0, total, 1.0)
  cross_entropy = weighted_mean(log_normalizer - target_logits)
  z_term = z_loss * weighted_mean(jnp.square(log_normalizer))
  accuracy = weighted_mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
  metrics = {'cross_entropy': cross_entropy, 'z_loss': z_term, 'token_accuracy': accuracy,
             'num_tokens': total}
  return cross_entropy + z_term, metrics
