"""Checkpoints that resume training bit-for-bit: state, data-iterator position and config.

The training state (parameters, optimizer state, step, rng) is saved with orbax's
`StandardSave` and restored onto whatever shardings the caller asks for (so a run can
resume on another mesh); the grain iterator state is saved beside it, so a resumed run
sees exactly the examples the uninterrupted run would have seen.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the newest `max_to_keep` checkpoints under `directory`, saving asynchronously."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config=None) -> None:
    """Starts saving; the state's device buffers are copied before this returns."""
    if step in self.manager.all_steps():
      return
    items = dict(state=ocp.args.StandardSave(state),
                 data=grain.checkpoint.CheckpointSave(data_iterator))
    if config is not None:
      items['config'] = ocp.args.JsonSave(config.to_dict())
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iterator):
    """Restores the state onto `abstract_state`'s shardings and rewinds `data_iterator`.

    abstract_state: a tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`.
    """
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored['state']

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` placed with `shardings`: the restore target."""
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      state, shardings)
