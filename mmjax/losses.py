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
