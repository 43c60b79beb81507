"""The interface between a model family and the model-agnostic training loop.

A task owns its model (assembled in `mmjax.models`), its loss, its data and which evaluators
it can feed; `mmjax.train` owns the mesh, the optimizer, checkpoints and logging. A new
family is a new `Task` subclass registered in `mmjax.tasks.TASKS`; the loop does not change.
Building a task builds modules only: data is built on disk where it is first read
(`train_iterator`, an evaluator builder).
"""

import abc
from typing import Any, Iterator, Protocol

import jax

from mmjax import evals
from mmjax.evals import capabilities as capabilities_lib


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

  def capabilities(self) -> capabilities_lib.Capabilities:
    """What this task's evaluators can call (`mmjax.evals.capabilities`). Default: none."""
    return capabilities_lib.Capabilities()

  @abc.abstractmethod
  def eval_data(self) -> capabilities_lib.EvalData:
    """Where the evaluators read data and the format the model reads (image size, tokenizer,
    prompt layout); building it touches no files."""

  def evaluators(self, mesh) -> dict[str, Evaluator]:
    """Evaluators by name from `config.evals` (`mmjax.evals.build`); their metrics are
    logged as `name/metric`."""
    return evals.build(self.config.evals, self.capabilities(), self.eval_data(), mesh)

  def update_params(self, params, aux: dict, trainable):
    """Updates that are not gradient steps, run inside the train step after the optimizer's.

    `aux` is the loss's second output (averaged over micro-batches); a task may put
    statistics there for this hook (e.g. the VQ tokenizer's EMA codebook and dead-code
    restarts, `mmjax/tasks/vq.py`). `trainable` is `config.trainable` as a tree of bools
    over `params` (`mmjax.train.trainable_mask`): a param it marks False is frozen and must
    come back unchanged (counters that are not weights, like the VQ GAN's step count, are
    the task's to keep). Returns `(params, metrics)`: the params, same tree and shapes, and
    the scalar metrics to log. Default: no change.
    """
    del trainable
    return params, aux

  @abc.abstractmethod
  def train_data_identity(self) -> dict:
    """What the training data is, as a JSON-able dict saved with every checkpoint: the
    datasets' builder versions and content hashes (`pipeline.dataset_identity`) and whatever
    decides the data mix on this machine. Called after `train_iterator` built the data; a
    resume whose identity differs is refused (`mmjax.train.check_resume`)."""

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
    work; `mmjax.tasks.validate_config` calls it before anything compiles."""

  @classmethod
  def import_weights(cls, config, path: str):
    """Params of a public checkpoint at `path` (e.g. a Hugging Face `save_pretrained`
    directory), with `config.model` rewritten in place to describe them
    (`mmjax.evaluate --hf_dir`). Default: this family imports none."""
    raise NotImplementedError(f'config.task={config.task!r} cannot import weights from {path}')
