"""Device mesh, logical-axis rules and the helpers that place arrays on the mesh.

Parameters and activations name their axes logically (`embed`, `mlp`, `heads`, ...);
`LOGICAL_AXIS_RULES` is the one table that maps those names onto the mesh axes
`data`, `fsdp` and `tensor`. Data parallel, FSDP and tensor parallel are therefore
a change of `config.mesh`, never of the model:

  data=8                  batch over 8 devices, parameters replicated
  data=2, fsdp=4          batch over all 8, parameters sharded 4 ways on `embed`
  data=2, fsdp=2, tensor=2  as above, plus attention heads and MLP hidden units split 2 ways
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis name -> mesh axes. Parameter axes first, then activation axes.
LOGICAL_AXIS_RULES = (
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('length', None),
    ('layers', None),
    ('act_batch', ('data', 'fsdp')),
    ('act_length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
)


class MeshSizeError(ValueError):
  """`config.mesh` is well formed but its sizes do not use exactly the devices given (a mesh
  made for another device count: `mmjax.evaluate` falls back to data parallelism on it)."""


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves `config.mesh` (sizes per axis, at most one -1 = the rest) to sizes.

  The sizes must multiply to exactly `num_devices`: a mesh never uses a subset of the devices
  silently (on several processes the first devices are all process 0's).

  Args:
    mesh_config: `config.mesh`, a mapping of axes in `MESH_AXES` to sizes (missing axes: 1).
    num_devices: the devices the mesh will be made of.

  Returns:
    `{axis: size}` for every axis of `MESH_AXES`, the sizes multiplying to `num_devices`.

  Raises:
    MeshSizeError: the sizes do not use exactly `num_devices` devices.
    ValueError: an unknown axis, a size that is neither positive nor -1, or two -1 axes.
  """
  unknown = set(mesh_config.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {sorted(unknown)}; known: {MESH_AXES}')
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {free}')
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f'config.mesh.{axis}={size}: sizes are positive or -1')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise MeshSizeError(
          f'config.mesh: the fixed axes use {fixed} devices, which does not divide the '
          f'{num_devices} devices available, so config.mesh.{free[0]}=-1 has no size')
    sizes[free[0]] = num_devices // fixed
  total = math.prod(sizes.values())
  if total > num_devices:
    raise MeshSizeError(
        f'config.mesh={sizes} needs {total} devices but only {num_devices} are available; '
        'set one axis to -1 (the remaining devices)')
  if total < num_devices:
    raise MeshSizeError(
        f'config.mesh={sizes} uses {total} devices but {num_devices} are given, and a mesh '
        'uses all the devices it is given; set one axis to -1 (the remaining devices), or '
        f'give it only {total} devices (make_mesh(..., devices=jax.devices()[:{total}]))')
  return sizes


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A mesh over exactly `devices` (default: all, `jax.devices()`) with axes `data`, `fsdp`,
  `tensor`.

  The sizes of `mesh_config` must multiply to `len(devices)` (`mesh_shape`): a smaller mesh
  than the devices raises a `MeshSizeError` instead of taking the first devices, which on
  several processes would all be process 0's. A caller that wants fewer devices passes them,
  e.g. `make_mesh(dict(data=1), jax.devices()[:1])` as the one-device reference of a sharded
  run.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_config, len(devices))
  grid = np.asarray(devices).reshape([sizes[axis] for axis in MESH_AXES])
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh):
  """Puts the mesh and `LOGICAL_AXIS_RULES` in scope.

  Trace jitted functions inside it, so that `nn.with_logical_constraint` constrains
  activations (outside it those constraints are no-ops).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch is split (the mesh axes that `act_batch` maps to)."""
  return mesh.shape['data'] * mesh.shape['fsdp']


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data` and `fsdp`, everything else replicated."""
  return NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh):
  """Shardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

  Unboxed leaves (step counters, rng keys, optimizer scalars) are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def strip_boxes(tree):
  """Replaces `nn.LogicallyPartitioned` boxes by their values, adding no constraints."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def check_divisible(abstract_tree, shardings, what: str) -> None:
  """Raises a clear error if a sharded dimension does not divide by its mesh size.

  Catches e.g. a width not divisible by `config.mesh.fsdp` before compilation.
  """
  leaves = jax.tree_util.tree_leaves_with_path(strip_boxes(abstract_tree))
  pairs = list(zip(leaves, jax.tree_util.tree_leaves(shardings)))
  # Parameters first: their names are the ones to report (optimizer moments mirror them).
  pairs.sort(key=lambda pair: 'params' not in jax.tree_util.keystr(pair[0][0]))
  for (path, leaf), sharding in pairs:
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else axes
      ways = math.prod(sharding.mesh.shape[axis] for axis in axes)
      if dim % ways:
        name = jax.tree_util.keystr(path)
        raise ValueError(
            f'{what}{name} has shape {leaf.shape}: dimension {dim} is split over mesh '
            f'axes {axes} ({ways} ways) and does not divide; change the model size or '
            f'config.mesh')


def global_batch(local_batch, sharding: NamedSharding):
  """Assembles per-host numpy batches into one global `jax.Array` per key."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def put_replicated_data(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Places an array that every host holds in full (e.g. an eval set) with `sharding`."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
