"""Running a jitted function over a whole eval set in fixed-size, padded, sharded batches.

Every host holds the whole (small) eval set; batches are padded up to one fixed size that
divides over the mesh's data-parallel axes, so one compiled program serves every batch, and
the padding rows are dropped again, so each example counts exactly once on any mesh and any
number of hosts.
"""

import math

import jax
import numpy as np

from mmjax import sharding


def round_to_mesh(batch_size: int, mesh) -> int:
  """The smallest multiple of the data-parallel size that is at least `batch_size`."""
  ways = sharding.data_parallel_size(mesh)
  return max(ways, math.ceil(batch_size / ways) * ways)


class BatchedApply:
  """`self(params, inputs) -> np.ndarray [n, ...]`: `fn` applied batch by batch (a pytree
  of such arrays where `fn` returns a pytree).

  `inputs` is an array [n, ...] or a dict (any pytree) of arrays [n, ...].
  fn(params, batch [b, ...]) -> [b, ...] is jitted once; its outputs come back replicated
  (so every host sees all of them) as numpy arrays. The last batch is padded with copies of
  its last real row (valid input for any fn, e.g. no empty prompts), whose outputs are dropped.
  """

  def __init__(self, fn, mesh, batch_size: int):
    self.mesh = mesh
    self.batch_size = round_to_mesh(batch_size, mesh)
    self._fn = jax.jit(fn, out_shardings=sharding.replicated(mesh))
    self._batch_sharding = sharding.batch_sharding(mesh)

  def __call__(self, params, inputs) -> np.ndarray:
    inputs = jax.tree.map(np.asarray, inputs)
    lengths = {len(x) for x in jax.tree.leaves(inputs)}
    if len(lengths) != 1:
      raise ValueError(f'inputs of different lengths: {sorted(lengths)}')
    n = lengths.pop()
    if not n:
      raise ValueError('no inputs to evaluate on (empty eval split?)')
    outputs = []
    for start in range(0, n, self.batch_size):
      real = min(self.batch_size, n - start)
      padded = jax.tree.map(
          lambda x: np.concatenate([x[start:start + real],
                                    np.repeat(x[start + real - 1:start + real],
                                              self.batch_size - real, 0)]), inputs)
      with sharding.activate(self.mesh):
        batch = jax.tree.map(
            lambda x: sharding.put_replicated_data(x, self._batch_sharding), padded)
        outputs.append(jax.tree.map(lambda x: np.asarray(x)[:real], self._fn(params, batch)))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
