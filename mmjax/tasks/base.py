"""The interface between a model family and the model-agnostic training loop.

A task owns its model, its data and its evaluators; `mmjax.train` owns the mesh, the
optimizer, checkpoints and logging. A new family is a new `Task` subclass registered
in `mmjax.tasks.TASKS`; the loop does not change.
"""

import abc
from typing import Any, Iterator, Protocol

import jax


class Evaluator(Protocol):
  """Runs on the current parameters and returns scalar metrics by name."""

  def run(self, params) -> dict[str, float]:
    ...


class Task(abc.ABC):
  """One model family's training objective."""

  def __init__(self, config):
    self.config = config

  @abc.abstractmethod
  def init(self, rng: jax.Array) -> Any:
    """Fresh parameters, leaves boxed with logical axis names (`nn.LogicallyPartitioned`)."""

  @abc.abstractmethod
  def loss(self, params, batch: dict[str, jax.Array], rng: jax.Array):
    """`(scalar loss, {name: scalar metric})` for one (micro-)batch; pure and jittable."""

  @abc.abstractmethod
  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global training batch of `batch_size` examples."""

  @abc.abstractmethod
  def train_iterator(self, *, process_index: int, process_count: int) -> Iterator[dict]:
    """Infinite iterator of this host's share of each global batch (numpy arrays).

    Must have `get_state()`/`set_state()` (a grain iterator) so checkpoints can hold it.
    """

  @abc.abstractmethod
  def evaluators(self, mesh) -> dict[str, Evaluator]:
    """Evaluators by name; their metrics are logged as `name/metric`."""

  def update_params(self, params, aux: dict):
    """Updates that are not gradient steps, run inside the train step after the optimizer's.

    `aux` is the loss's second output (averaged over micro-batches); a task may put
    statistics there for this hook (e.g. the VQ tokenizer's EMA codebook and dead-code
    restarts, `mmjax/tasks/vq.py`). Returns `(params, metrics)`: the params, same tree and
    shapes, and the scalar metrics to log. Default: no change.
    """
    return params, aux

  def pretrained_params(self) -> dict:
    """Top-level param subtrees to load into fresh params, `{name: tree of arrays}` whose
    names and shapes match `init`'s (e.g. LLaVA's `vision_tower` from a CLIP run).

    The Trainer calls it once, when training starts from scratch (never on resume).
    Default: none.
    """
    return {}

  @classmethod
  def validate_config(cls, config) -> None:
    """Raises ValueError naming the key of a setting of this family's config that cannot
    work; `mmjax.config_lib.validate` calls it before anything compiles."""
