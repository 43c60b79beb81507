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
  """`self(params, inputs [n, ...]) -> np.ndarray [n, ...]`: `fn` applied batch by batch.

  fn(params, batch [b, ...]) -> [b, ...] is jitted once; its outputs come back replicated
  (so every host sees all of them) as numpy arrays.
  """

  def __init__(self, fn, mesh, batch_size: int):
    self.mesh = mesh
    self.batch_size = round_to_mesh(batch_size, mesh)
    self._fn = jax.jit(fn, out_shardings=sharding.replicated(mesh))
    self._batch_sharding = sharding.batch_sharding(mesh)

  def __call__(self, params, inputs: np.ndarray) -> np.ndarray:
    inputs = np.asarray(inputs)
    if not len(inputs):
      raise ValueError('no inputs to evaluate on (empty eval split?)')
    outputs = []
    for start in range(0, len(inputs), self.batch_size):
      chunk = inputs[start:start + self.batch_size]
      real = len(chunk)
      padding = np.zeros((self.batch_size - real,) + chunk.shape[1:], chunk.dtype)
      with sharding.activate(self.mesh):
        result = self._fn(params, sharding.put_replicated_data(
            np.concatenate([chunk, padding]), self._batch_sharding))
      outputs.append(np.asarray(result)[:real])
    return np.concatenate(outputs)
