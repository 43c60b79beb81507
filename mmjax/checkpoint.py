"""Checkpoints that resume training bit-for-bit: state, data-iterator position and config.

The training state (parameters, optimizer state, step, rng) is saved with orbax's
`StandardSave` and restored onto whatever shardings the caller asks for (so a run can
resume on another mesh); the grain iterator state is saved beside it, so a resumed run
sees exactly the examples the uninterrupted run would have seen, and so are the config and
the identity of the training data.

A save is written into a temporary directory and renamed when complete (orbax), so a kill
during a save leaves the older checkpoints as they were; `restore_latest` skips a newest
checkpoint that is damaged (a truncated or missing file) for the newest one that restores.
"""

import json
import os
import shutil
import typing

import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

DAMAGED_DIR = 'damaged_checkpoints'  # beside the checkpoint directory


class Restored(typing.NamedTuple):
  """What `Checkpointer.restore_latest` found."""
  step: int
  state: typing.Any  # restored onto the caller's shardings
  config: dict | None  # the config saved with it (None if saved without)
  data_identity: dict | None  # the training data's identity saved with it (None: without)
  skipped: list[str]  # 'step N: why' for each newer checkpoint that did not restore


class Checkpointer:
  """Keeps the newest `max_to_keep` checkpoints under `directory`, saving asynchronously."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True))  # the unfinished saves of a killed run

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config=None,
           data_identity: dict | None = None) -> None:
    """Starts saving; the state's device buffers are copied before this returns."""
    if step in self.manager.all_steps():
      return
    items = dict(state=ocp.args.StandardSave(state),
                 data=grain.checkpoint.CheckpointSave(data_iterator))
    if config is not None:
      items['config'] = ocp.args.JsonSave(config.to_dict())
    if data_identity is not None:
      items['data_identity'] = ocp.args.JsonSave(data_identity)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_latest(self, abstract_state, data_iterator) -> Restored | None:
    """Restores the newest checkpoint that restores on every process (None: there is none).

    A checkpoint that fails to restore (orbax's DATA_LOSS on a truncated array file, a
    missing file, an iterator-state or config file that is not JSON) is skipped for the next
    older one. Once an older one restores, the damage was that checkpoint's own: the
    skipped ones are moved to `damaged_checkpoints/` beside the checkpoint directory (kept
    for a look, out of the way of new saves and of `max_to_keep`). If none restores, the
    error names every step and why, and nothing is moved (the cause is then more likely
    the run than the files, e.g. a changed model).
    """
    skipped = {}  # step -> why
    for step in sorted(self.manager.all_steps(), reverse=True):
      error = None
      try:
        state = self.restore(step, abstract_state, data_iterator)
        config = self.config(step)
        data_identity = self.data_identity(step)
      except Exception as e:  # pylint: disable=broad-except  (any damage; judged below)
        error = e
      if _on_every_process(error is None):
        self._set_aside(list(skipped))
        return Restored(step, state, config, data_identity,
                        [f'step {s}: {why}' for s, why in skipped.items()])
      reason = f'{type(error).__name__}: {error}' if error else 'failed on another process'
      skipped[step] = reason.strip().splitlines()[0][:300]
    if skipped:
      raise ValueError(f'no checkpoint in {self.manager.directory} restores:\n  ' + '\n  '.join(
          f'step {step}: {why}' for step, why in skipped.items()))
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves the damaged checkpoints `steps` to `damaged_checkpoints/<step>` (process 0)."""
    if not steps:
      return
    if jax.process_index() == 0:
      damaged = os.path.join(os.path.dirname(str(self.manager.directory)), DAMAGED_DIR)
      os.makedirs(damaged, exist_ok=True)
      for step in steps:
        target = os.path.join(damaged, str(step))
        if os.path.exists(target):
          shutil.rmtree(target)
        os.replace(os.path.join(self.manager.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('mmjax checkpoint: damaged set aside')
    self.manager.reload()

  def restore(self, step: int, abstract_state, data_iterator):
    """Restores the state onto `abstract_state`'s shardings and rewinds `data_iterator`.

    abstract_state: a tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`.
    """
    data_dir = os.path.join(self.manager.directory, str(step), 'data')
    own = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    if os.path.exists(os.path.join(data_dir, own)):
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
      return restored['state']
    # Written by another number of processes. Every process's iterator stands at the same
    # position (the step: host p reads the p-th block of each global batch), so any of
    # their states rewinds this one; they are checked to agree.
    data_iterator.set_state(_common_iterator_state(data_dir))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored['state']

  def config(self, step: int) -> dict | None:
    """The config saved with checkpoint `step` as a plain dict (None if saved without)."""
    return _saved_json(self.manager, step, 'config')

  def data_identity(self, step: int) -> dict | None:
    """The training data's identity saved with checkpoint `step` (None if saved without)."""
    return _saved_json(self.manager, step, 'data_identity')

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _common_iterator_state(data_dir: str) -> dict:
  """The data-iterator state that every process of the writing run saved (they agree)."""
  names = sorted(n for n in os.listdir(data_dir) if n.startswith('process_'))
  states = []
  for name in names:
    with open(os.path.join(data_dir, name)) as f:
      states.append(json.load(f))
  if not states or any(state != states[0] for state in states):
    raise ValueError(f'{data_dir}: the data-iterator states of the processes that wrote it '
                     f'differ or are missing ({names}); cannot resume on another process count')
  return states[0]


def _saved_json(manager, step: int, item: str) -> dict | None:
  if not os.path.isdir(os.path.join(manager.directory, str(step), item)):
    return None
  restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
  return restored[item]


def _on_every_process(ok: bool) -> bool:
  """Whether `ok` holds on every process (the processes must agree on which step to use)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` placed with `shardings`: the restore target."""
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      state, shardings)


class CheckpointReader:
  """Reads parameters and the config from a training run's checkpoints, on any mesh.

  Only the parameters are read (not the optimizer state); they land on the shardings the
  caller asks for, so a checkpoint written on 8 devices restores onto 1.
  """

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    if not os.path.isdir(self.directory):
      raise FileNotFoundError(f'no checkpoint directory {self.directory}')
    self.manager = ocp.CheckpointManager(self.directory)

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def resolve_step(self, step: int | None) -> int:
    """`step`, or the newest one when None; a clear error if there is none / not that one."""
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoints in {self.directory}')
    if step is None:
      return max(steps)
    if step not in steps:
      raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory}; '
                              f'steps there: {sorted(steps)}')
    return step

  def config(self, step: int) -> dict | None:
    """The config saved with the checkpoint, as a plain dict (None if saved without)."""
    return _saved_json(self.manager, step, 'config')

  def params(self, step: int, abstract_params):
    """Restores `state['params']` onto `abstract_params` (ShapeDtypeStructs with shardings)."""
    target = {'params': abstract_params}
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    return restored['state']['params']

  def numpy_params(self, step: int) -> dict:
    """The whole params tree of checkpoint `step` as host numpy arrays, shapes as saved.

    Needs no model: the tree and shapes come from the checkpoint's metadata. For loading
    part of a pretrained run into another model (e.g. LLaVA's vision tower from CLIP).
    """
    path = os.path.join(self.directory, str(step), 'state')
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = {'params': checkpointer.metadata(path).item_metadata.tree['params']}
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        jax.tree.map(lambda m: np.zeros((), m.dtype), metadata),
        restore_args=jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), metadata),
        partial_restore=True))
    return restored['params']

  def close(self) -> None:
    self.manager.close()
