r"""Training entry point: config -> mesh -> task -> sharded, resumable training loop.

  python -m mmjax.train --config configs/clip.py:small --workdir /tmp/clip_small \
      --config.lr=3e-4 --config.mesh.fsdp=2

Running the same command again with the same workdir resumes from the newest checkpoint
that restores (a damaged newer one is set aside, saying why); a resume that changes what
the saved data position means (batch size, seed, data) is refused unless
`--allow_config_change`. SIGTERM saves a checkpoint before exiting; on several processes
they agree on the step first (JAX's preemption sync point). A step whose loss, gradient norm
or updated parameters are not finite is not applied; `config.nonfinite` says whether the run
then stops (naming the step, saving nothing after it) or skips the step and counts it.
Every file the loop writes survives a kill at any byte (`mmjax.files`, orbax's atomic
saves). The loop knows nothing about the model: it asks the task (`mmjax.tasks`) for
parameters, the loss, data and evaluators.
"""

import os
import re
import signal
import time

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from mmjax import checkpoint
from mmjax import config_lib
from mmjax import distributed
from mmjax import evaluate
from mmjax import files
from mmjax import metrics_writer
from mmjax import sharding
from mmjax import tasks
from mmjax import xla_flags

# Config keys a resume may change without `--allow_config_change` (a trailing '.': every key
# under it): they change neither the examples behind a step, nor the meaning of the saved
# state, nor the update's arithmetic beyond float rounding (the mesh, grain's worker
# processes). A new total_steps re-stretches the learning-rate schedule from the resumed
# step. (grad_accum_steps is not here: it changes a contrastive loss's negatives.)
RESUMABLE_CHANGES = ('total_steps', 'log_every', 'eval_every', 'checkpoint_every',
                     'keep_checkpoints', 'record_example_ids', 'nonfinite',
                     'inject_nonfinite_at_step', 'mesh.', 'evals.', 'data.data_dir',
                     'data.worker_count')


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup to `config.lr`, then cosine decay to `end_lr_fraction * lr`."""
  warmup = min(config.schedule.warmup_steps, config.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1),
      end_value=config.lr * config.schedule.end_lr_fraction)


def trainable_mask(config, params):
  """Whether each param trains under `config.trainable`: a tree of bools over `params`.

  `config.trainable` (None: every param trains) is a regular expression matched
  with `re.fullmatch` against each param's '/'-joined path in the params tree, e.g.
  'projector/fc1/kernel' or 'lm/decoder/blocks/attn/query/kernel' (blocks under `nn.scan`
  are one stacked param); 'projector/.*' trains LLaVA's projector only, '(projector|lm)/.*'
  also its LM. `params` may hold `nn.LogicallyPartitioned` boxes, one param each. Raises
  ValueError naming `config.trainable` when the pattern is not a valid regex or matches no
  param.
  """
  pattern = config['trainable']
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  paths = jax.tree.map_with_path(
      lambda path, _: jax.tree_util.keystr(path, simple=True, separator='/'), params,
      is_leaf=is_box)
  if pattern is None:
    return jax.tree.map(lambda _: True, paths)
  try:
    regex = re.compile(pattern)
  except re.error as error:
    raise ValueError(f'config.trainable={pattern!r} is not a regular expression: {error}')
  mask = jax.tree.map(lambda path: regex.fullmatch(path) is not None, paths)
  if not any(jax.tree.leaves(mask)):
    examples = ', '.join(jax.tree.leaves(paths)[:4])
    raise ValueError(f'config.trainable={pattern!r} matches no parameter path (paths look '
                     f'like {examples}, ...); it must fullmatch at least one')
  return mask


def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; no weight decay on vectors and scalars.

  `config.adam.mu_dtype='bfloat16'` keeps the first moment in bfloat16 (the second stays
  float32, as do the parameters). Params that `config.trainable` leaves out (see
  `trainable_mask`) are frozen: their updates are exactly zero, they have no optimizer
  state (`optax.MaskedNode`) and no weight decay, and the clipping norm leaves them out.
  """
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  optimizer = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.adam.b1, b2=config.adam.b2,
                  eps=config.adam.eps, weight_decay=config.wd, mask=decay_mask,
                  mu_dtype=config.adam.mu_dtype))
  if config.trainable is None:
    return optimizer
  labels = lambda params: jax.tree.map(lambda trains: 'trainable' if trains else 'frozen',
                                       trainable_mask(config, params))
  return optax.multi_transform({'trainable': optimizer, 'frozen': optax.set_to_zero()}, labels)


class Trainer:
  """The jitted pieces of training for one config on one mesh.

  State is a dict `{'params', 'opt_state', 'step', 'rng', 'nonfinite_steps',
  'first_nonfinite_step'}` created already sharded (jit of init with out_shardings);
  `train_step` is jit with explicit in/out shardings and donates the state. The last two
  count the steps that were not applied because something was not finite, and name the
  first of them (-1: none).
  """

  def __init__(self, config, mesh, task=None):
    self.config = config
    self.mesh = mesh
    self.task = task or tasks.get_task(config)
    self.optimizer = make_optimizer(config)
    self.schedule = learning_rate_schedule(config)
    self.batch_sharding = sharding.batch_sharding(mesh)

    abstract = jax.eval_shape(self._init_boxed_state, jax.random.PRNGKey(0))
    self.state_shardings = sharding.logical_shardings(abstract, mesh)
    sharding.check_divisible(abstract, self.state_shardings, 'state')
    self.abstract_state = checkpoint.abstract_like(sharding.strip_boxes(abstract),
                                                  self.state_shardings)

    self.init_state = jax.jit(
        lambda rng: nn.unbox(self._init_boxed_state(rng)), out_shardings=self.state_shardings)
    replicated = sharding.replicated(mesh)
    self.train_step = jax.jit(
        self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    params_shardings = self.state_shardings['params']
    self.gradients = jax.jit(
        self._gradients, in_shardings=(params_shardings, self.batch_sharding, replicated),
        out_shardings=(replicated, replicated, params_shardings))

  def load_pretrained(self, state):
    """Fresh `state` with the task's pretrained param subtrees put in
    (`Task.pretrained_params`), placed on the params' shardings; shapes must match."""
    params = dict(state['params'])
    for name, subtree in self.task.pretrained_params().items():
      if name not in params:
        raise ValueError(f'pretrained params {name!r}: the model has no such part (it has '
                         f'{sorted(params)})')
      expected = dict(jax.tree_util.tree_leaves_with_path(params[name]))
      loaded = dict(jax.tree_util.tree_leaves_with_path(subtree))
      for path in expected.keys() | loaded.keys():
        where = name + jax.tree_util.keystr(path)
        if path not in loaded or path not in expected:
          raise ValueError(f'pretrained params: {where} is '
                           + ('missing' if path not in loaded else 'not in the model'))
        if tuple(expected[path].shape) != tuple(loaded[path].shape):
          raise ValueError(f'pretrained params: {where} has shape {loaded[path].shape}, the '
                           f'model wants {expected[path].shape}')
      shardings = self.state_shardings['params'][name]
      params[name] = jax.tree.map(
          lambda value, like, where: jax.make_array_from_callback(
              like.shape, where, lambda index, v=np.asarray(value, like.dtype): v[index]),
          subtree, params[name], shardings)
    return dict(state, params=params)

  def _init_boxed_state(self, rng):
    init_rng, train_rng = jax.random.split(rng)
    params = self.task.init(init_rng)
    return {'params': params, 'opt_state': self.optimizer.init(params),
            'step': jnp.zeros((), jnp.int32), 'rng': train_rng,
            'nonfinite_steps': jnp.zeros((), jnp.int32),
            'first_nonfinite_step': jnp.full((), -1, jnp.int32)}

  def _gradients(self, params, batch, rng):
    """`(loss, metrics, grads)` averaged over `config.grad_accum_steps` micro-batches.

    Micro-batch i takes rows i, i + k, i + 2k, ... so each device's share of the global
    batch is split evenly. For contrastive losses the negatives of an example are then
    those of its micro-batch, as in any accumulation without a feature cache.
    """
    grad_fn = jax.value_and_grad(self.task.loss, has_aux=True)
    steps = self.config.grad_accum_steps
    if steps == 1:
      (loss, metrics), grads = grad_fn(params, batch, rng)
      return loss, metrics, grads

    def split(x):
      micro = x.reshape((x.shape[0] // steps, steps) + x.shape[1:]).swapaxes(0, 1)
      return nn.with_logical_constraint(micro, (None, 'act_batch'))

    def accumulate(carry, inputs):
      micro_batch, micro_rng = inputs
      (loss, metrics), grads = grad_fn(params, micro_batch, micro_rng)
      return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, batch, rng))
    (loss, metrics), grads = zeros
    totals, _ = jax.lax.scan(accumulate, (loss, metrics, grads),
                             (jax.tree.map(split, batch), jax.random.split(rng, steps)))
    return jax.tree.map(lambda x: x / steps, totals)

  def _train_step(self, state, batch):
    step = state['step'] + 1  # the number of the step this call makes
    step_rng = jax.random.fold_in(state['rng'], state['step'])
    loss, metrics, grads = self._gradients(state['params'], batch, step_rng)
    if self.config.inject_nonfinite_at_step is not None:  # a fault for tests of the policy
      grads = jax.tree.map(
          lambda g: jnp.where(step == self.config.inject_nonfinite_at_step, jnp.nan, g), grads)
    updates, opt_state = self.optimizer.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    # Non-gradient updates the task computed in its loss (e.g. EMA codebooks); default none.
    trainable = trainable_mask(self.config, grads)
    params, metrics = self.task.update_params(params, metrics, trainable)
    # Frozen params' gradients stay out of the norm, so XLA need not compute them.
    trainable_grads = [grad for grad, trains in zip(
        jax.tree.leaves(grads), jax.tree.leaves(trainable)) if trains]
    grad_norm = optax.tree.norm(trainable_grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.stack(
        [jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
    # A step with anything non-finite is not applied: the state keeps its params and
    # optimizer state, so no non-finite value ever reaches a checkpoint.
    keep_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    nonfinite_steps = state['nonfinite_steps'] + jnp.where(finite, 0, 1)
    first = state['first_nonfinite_step']
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, nonfinite_steps=nonfinite_steps,
                   learning_rate=self.schedule(state['step']))
    new_state = {'params': keep_finite(params, state['params']),
                 'opt_state': keep_finite(opt_state, state['opt_state']), 'step': step,
                 'rng': state['rng'], 'nonfinite_steps': nonfinite_steps,
                 'first_nonfinite_step': jnp.where((first < 0) & ~finite, step, first)}
    return new_state, metrics


class _StopOnSigterm:
  """Whether to save and stop after a step, because this process or another got SIGTERM.

  One process: a SIGTERM handler sets a flag. Several: JAX's preemption service (started by
  `jax.distributed.initialize`, which handles SIGTERM itself) tells every process of a
  notice to any of them, and `multihost_utils.reached_preemption_sync_point` becomes true on
  the same step on all of them, so they all save that step; a flag per process could make
  one process enter the save while another enters the next step, and hang both.
  """

  def __init__(self):
    self._sync = jax.process_count() > 1
    self._requested = False
    if not self._sync:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def __call__(self, step: int) -> bool:
    """Must be called after every step, with the same steps on every process."""
    if self._sync:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def restore(self):
    if not self._sync:
      signal.signal(signal.SIGTERM, self._previous)


def check_resume(saved_config: dict | None, config, saved_identity: dict | None,
                 identity: dict, *, step: int, allow_config_change: bool) -> list[str]:
  """Refuses a resume whose config or training data differ from the checkpoint's in a way
  that changes what the saved state means; returns the lines to print about what changed.

  Changes of the keys in `RESUMABLE_CHANGES` are allowed; others (e.g. batch_size, seed,
  data.*: the saved data position would then mean other examples) and a different
  training-data identity (`Task.train_data_identity`: builder versions, content hashes,
  the data mix) raise ValueError naming them, unless `allow_config_change`.
  """
  changed = config_lib.changes(saved_config, config.to_dict()) if saved_config else []
  resumable = lambda line: any(line.startswith(key if key.endswith('.') else key + ':')
                               for key in RESUMABLE_CHANGES)
  refused = [line for line in changed if not resumable(line)]
  if saved_identity is not None and saved_identity != identity:
    refused += [f'training data {line}' for line in config_lib.changes(saved_identity, identity)]
  lines = [f'The config differs from the one step {step} was saved with: ' + '; '.join(changed)
           ] if changed else []
  if refused and not allow_config_change:
    raise ValueError(
        f'refusing to resume from step {step}: these changes alter what the saved state and '
        'data position mean: ' + '; '.join(refused) + '. Use the saved values, another '
        'workdir, or --allow_config_change to resume anyway.')
  if refused:
    lines.append('--allow_config_change: resuming despite ' + '; '.join(refused))
  return lines


def run(config, workdir: str, *, stop_at_step: int | None = None, devices=None,
        allow_config_change: bool = False):
  """Trains (or resumes) `config` in `workdir`.

  Returns `(state, eval_metrics)`: the final training state (sharded on the mesh) and
  the metrics of the last evaluation ({} if none ran).

  stop_at_step: save and return once this step is reached (as if preempted there).
  allow_config_change: resume even if the config or the training data changed in a way that
    changes what the checkpoint means (see `check_resume`).
  """
  devices = jax.devices() if devices is None else devices
  tasks.validate_config(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  is_chief = distributed.is_chief()
  log = print if is_chief else (lambda *args, **kwargs: None)  # Process 0 speaks.
  os.makedirs(workdir, exist_ok=True)

  with sharding.activate(mesh):
    trainer = Trainer(config, mesh)
    data = trainer.task.train_iterator(process_index=jax.process_index(),
                                       process_count=jax.process_count())
    data_identity = trainer.task.train_data_identity()
    checkpointer = checkpoint.Checkpointer(
        os.path.join(workdir, 'checkpoints'), max_to_keep=config.keep_checkpoints)
    restored = checkpointer.restore_latest(trainer.abstract_state, data)
    if restored is None:
      state = trainer.load_pretrained(trainer.init_state(jax.random.PRNGKey(config.seed)))
      start = 0
    else:
      state, start = restored.state, restored.step
      for line in restored.skipped:
        log(f'Checkpoint {line}: does not restore; moved to {checkpoint.DAMAGED_DIR}/',
            flush=True)
      log(f'Resumed from step {start} in {workdir}', flush=True)
      for line in check_resume(restored.config, config, restored.data_identity, data_identity,
                               step=start, allow_config_change=allow_config_change):
        log(line, flush=True)
    writer = metrics_writer.MetricsWriter(workdir, enabled=is_chief, resume_step=start)
    example_log = (ExampleIdLog(workdir, start) if config.record_example_ids else None)
    evaluators = trainer.task.evaluators(mesh)
    log(f'mesh {dict(mesh.shape)}, {_count(state["params"]):,} parameters, '
          f'training steps {start}..{config.total_steps}', flush=True)

    stop_requested = _StopOnSigterm()
    end = config.total_steps if stop_at_step is None else min(stop_at_step, config.total_steps)
    timer = _Throughput(config.batch_size, start)
    eval_metrics = {}
    step = start

    def save():
      _check_finite(state, config)
      checkpointer.save(step, state, data, config, data_identity)

    try:
      while step < end:
        local_batch = next(data)
        if example_log:
          example_log.write(step, local_batch['example_id'])
        batch = sharding.global_batch(
            {key: local_batch[key] for key in trainer.task.batch_spec(1)}, trainer.batch_sharding)
        state, metrics = trainer.train_step(state, batch)
        step += 1
        stopping = stop_requested(step)
        if step % config.log_every == 0 or step == end:
          _check_finite(state, config)
          metrics = jax.device_get(metrics)
          rates = timer.update(step, config.total_steps)
          writer.write(step, {f'train/{k}': v for k, v in metrics.items()} | rates)
          skipped = (f'  {metrics["nonfinite_steps"]} non-finite steps skipped'
                     if metrics['nonfinite_steps'] else '')
          log(f'step {step:6d}/{config.total_steps}  loss {metrics["loss"]:.4f}  '
                f'lr {metrics["learning_rate"]:.2e}  {rates["examples_per_sec"]:.0f} ex/s  '
                f'ETA {_duration(rates["eta_seconds"])}{skipped}', flush=True)
        if step % config.checkpoint_every == 0 or stopping:
          save()
        if stopping:
          log(f'SIGTERM: saved step {step}, exiting', flush=True)
          break
        if evaluators and (step % config.eval_every == 0 or step == config.total_steps):
          eval_metrics = evaluate.evaluate(evaluators, state['params'])
          writer.write(step, eval_metrics)
          if is_chief:
            _print_eval(step, eval_metrics)
          if step == config.total_steps and is_chief:
            evaluate.write_reports(evaluators, os.path.join(workdir, 'eval'), step)
          timer.pause()
      save()
      checkpointer.wait()
    finally:
      stop_requested.restore()
      checkpointer.close()
      writer.close()
  return state, eval_metrics


def _check_finite(state, config) -> None:
  """Under `config.nonfinite='stop'`, raises FloatingPointError naming the first step that
  was not applied for a non-finite loss, gradient norm or parameter (before any save)."""
  first = int(jax.device_get(state['first_nonfinite_step']))
  if config.nonfinite == 'stop' and first >= 0:
    raise FloatingPointError(
        f'step {first}: the loss, gradient norm or updated parameters were not finite; '
        f'stopping without saving anything after step {first - 1} '
        "(config.nonfinite='skip' skips such steps instead)")


class ExampleIdLog:
  """Appends the example ids of each step to `example_ids.<process>.jsonl` in the workdir.

  On resume the entries at or after the restored step are dropped first (the file is
  rewritten atomically; a line torn by a kill is dropped), so the file is always the exact
  sequence of examples behind the current parameters.
  """

  def __init__(self, workdir: str, start_step: int):
    self.path = os.path.join(workdir, f'example_ids.{jax.process_index()}.jsonl')
    if os.path.exists(self.path):
      files.rewrite_jsonl(self.path, [record for record in files.read_jsonl(self.path)
                                      if record['step'] < start_step])

  def write(self, step: int, example_ids) -> None:
    files.append_jsonl(self.path, {'step': step, 'ids': np.asarray(example_ids).tolist()})


def read_example_ids(workdir: str, process_index: int = 0) -> list[list[int]]:
  """The sequence of example-id lists that `ExampleIdLog` wrote, one per step."""
  path = os.path.join(workdir, f'example_ids.{process_index}.jsonl')
  return [record['ids'] for record in files.read_jsonl(path)]


class _Throughput:
  """Examples per second and time left, measured between log lines (evaluation excluded)."""

  def __init__(self, batch_size: int, step: int):
    self.batch_size = batch_size
    self.step, self.time = step, time.time()

  def pause(self):
    """Restarts the clock after work that is not training (evaluation)."""
    self.time = time.time()

  def update(self, step: int, total_steps: int) -> dict[str, float]:
    now = time.time()
    seconds_per_step = (now - self.time) / max(step - self.step, 1)
    self.step, self.time = step, now
    return {'examples_per_sec': self.batch_size / seconds_per_step,
            'eta_seconds': seconds_per_step * (total_steps - step)}


def _count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes}m{seconds:02d}s'


def _print_eval(step: int, metrics: dict[str, float]) -> None:
  suffixes = ('top1', 'top5', 'R@1', 'R@5', 'psnr', 'ssim', 'codebook_usage', 'exact_match',
              'cider', 'bleu4', 'accuracy')
  shown = {k: v for k, v in metrics.items() if k.endswith(suffixes)}
  print(f'eval at step {step}: ' + '  '.join(f'{k} {v:.3f}' for k, v in sorted(shown.items())),
        flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  xla_flags.apply()  # before JAX starts a backend: malloc settings for XLA:CPU steps
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  distributed.initialize(*(holder.value for holder in _DISTRIBUTED))
  run(_CONFIG.value, _WORKDIR.value, stop_at_step=_STOP_AT_STEP.value,
      allow_config_change=_ALLOW_CONFIG_CHANGE.value)


if __name__ == '__main__':
  # Defined here, not at import, so both entry points can be imported in one process.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:variant].')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
  _STOP_AT_STEP = flags.DEFINE_integer(
      'stop_at_step', None, 'Save and exit once this step is reached, as if preempted there '
      '(the schedule still runs to config.total_steps).')
  _ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
      'allow_config_change', False, 'Resume even if batch_size, seed, the data or other keys '
      'that change what the checkpoint means differ from the saved config.')
  _DISTRIBUTED = distributed.define_flags()
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
