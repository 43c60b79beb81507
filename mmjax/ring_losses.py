"""Contrastive losses over the global batch that never build the global `[B, B]` logits.

`mmjax.losses` computes the `[B, B]` logits under GSPMD, sharded by rows: each of the n
batch shards holds `[B/n, B]` floats, plus as much again for the backward pass. Here each
device keeps its image block `[B/n, d]` and the text blocks travel around a ring over the
batch mesh axes (`data` and `fsdp` together, n devices) with `jax.lax.ppermute`: at step
k device p holds the text block of device p - k and computes one `[B/n, B/n]` block of
logits, so per-device memory is O((B/n)^2 + B/n * d) whatever n is.

  sigmoid (SigLIP): each device sums `-log_sigmoid(z * logits)` over its blocks; positives
    (z = +1) only on the diagonal of step 0 (its own texts); the sum over all devices / B
    is the loss, as `losses.sigmoid_contrastive_loss` (big_vision's normalisation).
  softmax (CLIP): image->text log-sum-exps are streamed row-wise (running max and sum) as
    the text blocks pass; text->image column statistics (running max and sum of each text
    block's column) travel with the text block and are sent home after the last step, so
    one ring pass gives both directions.

Gradients come from a `jax.custom_vjp` whose backward pass runs the ring again: it
recomputes each logit block from the embeddings (as flash attention does) and the text
gradient accumulates in a buffer that travels with its text block and is sent home at the
end, so the backward pass also holds one block at a time (autodiff through the forward
ring would keep every step's text block and logits as residuals). The cost is one more
`[B/n, B/n, d]` matmul per block than plain autodiff (4 instead of 3).

The tensor axis, if any, is replicated for the loss (each tensor replica computes the
same loss). The mesh is the one passed, else the one set by `sharding.activate`, else the
one of the embeddings' `NamedSharding` (also inside `jit`). Without a mesh, embeddings on
one device (or a mesh with no batch axes) make the whole batch one block: the same
arithmetic on one device; embeddings that are, or may be, on several devices raise a
ValueError rather than silently gather the batch.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# The mesh axes of `act_batch` in `sharding.LOGICAL_AXIS_RULES`.
BATCH_AXES = ('data', 'fsdp')


def _array_mesh(x):
  """The mesh of `x`'s `NamedSharding` over more than one device, else None.

  A concrete `jax.Array` gives its own (concrete) mesh; a tracer inside `jit` gives the
  abstract mesh that its inputs' shardings carry (empty if they carry none).
  """
  if isinstance(x, jax.core.Tracer):
    mesh = getattr(jax.typeof(x).sharding, 'mesh', None)
  elif isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding):
    mesh = x.sharding.mesh
  else:
    mesh = None
  return mesh if mesh is not None and not mesh.empty and mesh.size > 1 else None


def _on_one_device(x):
  """Whether `x` surely lives on one device: a host value, a one-device array, or traced
  where there is only one device."""
  if isinstance(x, jax.core.Tracer):
    return jax.device_count() == 1
  return not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1


def _resolve_mesh(mesh, image, text):
  """The mesh to run on, or None for the whole batch as one block on one device.

  In order: `mesh`; the one set by `jax.set_mesh` (`sharding.activate`); the mesh of the
  embeddings' `NamedSharding` (see `_array_mesh`). Without any, the embeddings must be on
  one device: one block over a batch split across devices would gather it, and the
  `[B, B]` logits the ring exists to avoid with it.

  Raises:
    ValueError: no mesh is given, none is set, the embeddings carry none, and they are (or,
      traced, may be) on more than one device.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    return mesh
  for x in (image, text):
    if (found := _array_mesh(x)) is not None:
      return found
  for name, x in (('image_embeddings', image), ('text_embeddings', text)):
    if not _on_one_device(x):
      how = 'traced with no mesh in its sharding' if isinstance(x, jax.core.Tracer) else (
          f'on {len(x.sharding.device_set)} devices with no NamedSharding')
      raise ValueError(
          f'ring loss: {name} {jnp.shape(x)} is {how}, no mesh was passed and none is set, '
          f'so the batch cannot be split into ring blocks (one block would gather the '
          f'[B, B] logits). Pass `mesh=` or trace inside `sharding.activate(mesh)`.')
  return None


def _batch_axes(mesh, batch_axes):
  if mesh is None:
    return ()
  return tuple(axis for axis in batch_axes if axis in mesh.axis_names)


class _Ring:
  """Collectives over the batch axes inside `shard_map` (no-ops for a single block)."""

  def __init__(self, axes, size):
    self.axes = axes if size > 1 else None
    self.size = size

  def send(self, tree):
    """Device p's `tree` goes to device p + 1 (mod n)."""
    if self.axes is None:
      return tree
    perm = [(i, (i + 1) % self.size) for i in range(self.size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, self.axes, perm), tree)

  def psum(self, tree):
    if self.axes is None:
      return tree
    return jax.tree.map(lambda x: jax.lax.psum(x, self.axes), tree)

  def loop(self, step, acc, travelling, moving):
    """Runs `step(diagonal, acc, travelling, moving) -> (acc, moving)` over the n blocks.

    `travelling` (the text block and what belongs to it) goes around the ring unchanged;
    `moving` (per-text-block accumulators) is updated by each device it passes and is
    back on its home device at the end. Each step sends the next block before computing
    on the current one, so the transfer can overlap the compute.
    """
    n = self.size
    if n == 1:
      return step(True, acc, travelling, moving)
    incoming = self.send(travelling)
    acc, moving = step(True, acc, travelling, moving)
    moving = self.send(moving)

    def body(carry, _):
      acc, travelling, moving = carry
      incoming = self.send(travelling)
      acc, moving = step(False, acc, travelling, moving)
      return (acc, incoming, self.send(moving)), None

    (acc, travelling, moving), _ = jax.lax.scan(body, (acc, incoming, moving), length=n - 2)
    acc, moving = step(False, acc, travelling, moving)
    return acc, self.send(moving)  # after n - 1 steps the block's owner is the next device


def _dot(a, b):
  """`[m, d] x [k, d] -> [m, k]`."""
  return jnp.einsum('id,td->it', a, b)


def _labels(diagonal, shape):
  """+1 on the diagonal of the diagonal block, -1 elsewhere."""
  if diagonal:
    return 2.0 * jnp.eye(shape[0], shape[1], dtype=jnp.float32) - 1.0
  return -jnp.ones(shape, jnp.float32)


# ---------------------------------------------------------------------------- sigmoid


def _sigmoid_forward(ring, image, text, scale, bias):
  """Per device: `sum over its image rows and all texts of -log_sigmoid(z * logits)`."""

  def step(diagonal, total, text_block, moving):
    logits = _dot(image, text_block) * scale + bias
    labels = _labels(diagonal, logits.shape)
    return total - jnp.sum(jax.nn.log_sigmoid(labels * logits)), moving

  total, _ = ring.loop(step, jnp.zeros((), jnp.float32), text, ())
  return ring.psum(total)


def _sigmoid_backward(ring, image, text, scale, bias, coef):
  """Gradients of `coef * sum(-log_sigmoid(z * logits))` for this device's blocks."""

  def step(diagonal, acc, text_block, text_grad):
    image_grad, scale_grad, bias_grad = acc
    raw = _dot(image, text_block)
    logits = raw * scale + bias
    labels = _labels(diagonal, logits.shape)
    # d/dx -log_sigmoid(z x) = -z sigmoid(-z x)
    grad = -coef * labels * jax.nn.sigmoid(-labels * logits)
    image_grad = image_grad + scale * (grad @ text_block)
    text_grad = text_grad + scale * (grad.T @ image)
    acc = (image_grad, scale_grad + jnp.sum(grad * raw), bias_grad + jnp.sum(grad))
    return acc, text_grad

  zero = jnp.zeros((), jnp.float32)
  (image_grad, scale_grad, bias_grad), text_grad = ring.loop(
      step, (jnp.zeros_like(image), zero, zero), text, jnp.zeros_like(text))
  scale_grad, bias_grad = ring.psum((scale_grad, bias_grad))
  return image_grad, text_grad, scale_grad, bias_grad


# ---------------------------------------------------------------------------- softmax


def _merge(max_a, sum_a, max_b, sum_b):
  """Combines two partial (max, sum of exp(x - max)) log-sum-exp statistics."""
  new_max = jnp.maximum(max_a, max_b)
  return new_max, sum_a * jnp.exp(max_a - new_max) + sum_b * jnp.exp(max_b - new_max)


def _block_stats(logits, axis):
  block_max = jnp.max(logits, axis=axis)
  block_sum = jnp.sum(jnp.exp(logits - jnp.expand_dims(block_max, axis)), axis=axis)
  return block_max, block_sum


def _softmax_forward(ring, image, text, scale):
  """Per device: `(row_lse, col_lse, matching)` of its image rows and its text columns."""

  def step(diagonal, row_stats, text_block, col_stats):
    del diagonal
    logits = _dot(image, text_block) * scale
    row_stats = _merge(*row_stats, *_block_stats(logits, axis=1))
    col_stats = _merge(*col_stats, *_block_stats(logits, axis=0))
    return row_stats, col_stats

  b = image.shape[0]
  empty = (jnp.full((b,), -jnp.inf, jnp.float32), jnp.zeros((b,), jnp.float32))
  (row_max, row_sum), (col_max, col_sum) = ring.loop(step, empty, text, empty)
  matching = jnp.sum(image * text, axis=1) * scale
  return row_max + jnp.log(row_sum), col_max + jnp.log(col_sum), matching


def _softmax_backward(ring, image, text, scale, row_lse, col_lse, coef):
  """Gradients of `coef * sum(row_lse + col_lse - 2 * matching)` for this device's blocks."""

  def step(diagonal, acc, travelling, text_grad):
    image_grad, scale_grad = acc
    text_block, text_lse = travelling
    raw = _dot(image, text_block)
    logits = raw * scale
    grad = coef * (jnp.exp(logits - row_lse[:, None]) + jnp.exp(logits - text_lse[None, :]))
    if diagonal:  # the matching logits (subtracted in the block, where softmax ~ 1 cancels)
      grad = grad - 2.0 * coef * jnp.eye(*grad.shape, dtype=grad.dtype)
    image_grad = image_grad + scale * (grad @ text_block)
    text_grad = text_grad + scale * (grad.T @ image)
    return (image_grad, scale_grad + jnp.sum(grad * raw)), text_grad

  acc = (jnp.zeros_like(image), jnp.zeros((), jnp.float32))
  (image_grad, scale_grad), text_grad = ring.loop(
      step, acc, (text, col_lse), jnp.zeros_like(text))
  return image_grad, text_grad, ring.psum(scale_grad)


# ---------------------------------------------------------------------------- wrappers


@functools.lru_cache(maxsize=None)
def _build(kind, mesh, axes):
  """`custom_vjp` loss `(image, text, scale[, bias]) -> scalar` for one mesh and kind."""
  size = 1 if mesh is None else math.prod(mesh.shape[axis] for axis in axes)
  ring = _Ring(axes, size)
  rows = P(axes, None) if axes else P()

  def on_mesh(fn, in_specs, out_specs):
    if mesh is None:
      return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)

  def cast(x):
    return jnp.asarray(x, jnp.float32)

  if kind == 'sigmoid':
    forward = on_mesh(functools.partial(_sigmoid_forward, ring),
                      (rows, rows, P(), P()), P())
    backward = on_mesh(functools.partial(_sigmoid_backward, ring),
                       (rows, rows, P(), P(), P()), (rows, rows, P(), P()))

    @jax.custom_vjp
    def loss(image, text, scale, bias):
      return forward(cast(image), cast(text), cast(scale), cast(bias)) / image.shape[0]

    def loss_fwd(image, text, scale, bias):
      return loss(image, text, scale, bias), (image, text, scale, bias)

    def loss_bwd(residuals, g):
      image, text, scale, bias = residuals
      coef = cast(g) / image.shape[0]
      grads = backward(cast(image), cast(text), cast(scale), cast(bias), coef)
      return tuple(grad.astype(x.dtype) for grad, x in zip(grads, residuals))

  else:
    forward = on_mesh(functools.partial(_softmax_forward, ring),
                      (rows, rows, P()), (P(axes), P(axes), P(axes)))
    backward = on_mesh(functools.partial(_softmax_backward, ring),
                       (rows, rows, P(), P(axes), P(axes), P()), (rows, rows, P()))

    def value(row_lse, col_lse, matching):
      return 0.5 * (jnp.mean(row_lse - matching) + jnp.mean(col_lse - matching))

    @jax.custom_vjp
    def loss(image, text, scale):
      return value(*forward(cast(image), cast(text), cast(scale)))

    def loss_fwd(image, text, scale):
      row_lse, col_lse, matching = forward(cast(image), cast(text), cast(scale))
      return value(row_lse, col_lse, matching), (image, text, scale, row_lse, col_lse)

    def loss_bwd(residuals, g):
      image, text, scale, row_lse, col_lse = residuals
      coef = 0.5 * cast(g) / image.shape[0]
      grads = backward(cast(image), cast(text), cast(scale), row_lse, col_lse, coef)
      return tuple(grad.astype(x.dtype) for grad, x in zip(grads, (image, text, scale)))

  loss.defvjp(loss_fwd, loss_bwd)
  return jax.jit(loss)


def _check_batch(image, text, mesh, axes):
  if image.shape != text.shape or image.ndim != 2:
    raise ValueError(f'ring losses take image and text embeddings [batch, dim] of one shape; '
                     f'got {image.shape} and {text.shape}')
  ways = math.prod(mesh.shape[axis] for axis in axes)
  if image.shape[0] % ways:
    raise ValueError(f'batch {image.shape[0]} is not divisible by the {ways} devices of '
                     f'the batch mesh axes {axes}')


def _get(kind, image, text, mesh, batch_axes):
  mesh = _resolve_mesh(mesh, image, text)
  axes = _batch_axes(mesh, batch_axes)
  if not axes:
    mesh = None
  _check_batch(image, text, mesh, axes)
  return _build(kind, mesh, axes)


def sigmoid_contrastive_loss(image_embeddings, text_embeddings, logit_scale, logit_bias, *,
                             mesh=None, batch_axes=BATCH_AXES):
  """SigLIP's loss over the global batch, as `losses.sigmoid_contrastive_loss`, on a ring.

  `mesh` defaults to the one set by `jax.set_mesh` (`sharding.activate`), else the
  embeddings' own (`_resolve_mesh`); their batch axis is split over its `batch_axes` (the
  other axes replicate the computation).

  Args:
    image_embeddings: `[B, d]`, B divisible by the batch axes' device count.
    text_embeddings: `[B, d]`, row i the pair of image row i.
    logit_scale: scalar.
    logit_bias: scalar.
    mesh: the mesh to run on; None for the default above.
    batch_axes: the mesh axes the batch is split over (those the mesh has).

  Returns:
    The scalar loss.

  Raises:
    ValueError: on shapes that differ or a batch the devices do not divide, or, with no mesh
      found, embeddings that may be on several devices.
  """
  fn = _get('sigmoid', image_embeddings, text_embeddings, mesh, batch_axes)
  return fn(image_embeddings, text_embeddings, logit_scale, logit_bias)


def softmax_contrastive_loss(image_embeddings, text_embeddings, logit_scale, *, mesh=None,
                             batch_axes=BATCH_AXES):
  """CLIP's symmetric InfoNCE over the global batch, as `losses.softmax_contrastive_loss`,
  with streaming log-sum-exps on a ring (see the module docstring).

  Arguments, mesh resolution and errors as `sigmoid_contrastive_loss` (without a bias).
  """
  fn = _get('softmax', image_embeddings, text_embeddings, mesh, batch_axes)
  return fn(image_embeddings, text_embeddings, logit_scale)
