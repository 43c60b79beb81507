"""Metrics to `<name>.jsonl`, TensorBoard event files, and curve PNGs in the workdir, each
safe against a kill at any byte (`mmjax.files`)."""

import os

from matplotlib.figure import Figure  # No pyplot: no global backend is chosen or needed.
import numpy as np

from mmjax import files

# Eval metrics worth a curve: accuracy and recall at the first rank.
_CURVE_SUFFIXES = ('top1', 'top5', 'R@1', 'R@5')


class MetricsWriter:
  """Writes scalars by step into the workdir (only where `enabled`, i.e. on host 0).

  name: 'metrics' for training (`metrics.jsonl`, `tensorboard/`), e.g. 'eval_metrics' for
  a separate evaluation run (`eval_metrics.jsonl`, `tensorboard/eval_metrics/`).
  resume_step: the step training resumes from (None: not a resume). Records past it, left
    by a run that died after its last checkpoint, are dropped from the `.jsonl` (rewritten
    atomically), and TensorBoard is told to purge its events past it, so a resumed run
    never shows a step twice.
  """

  def __init__(self, workdir: str, *, name: str = 'metrics', enabled: bool = True,
               resume_step: int | None = None):
    self.workdir = workdir
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, f'{name}.jsonl')
    self.tensorboard = None
    if not enabled:
      return
    if resume_step is not None and os.path.exists(self.jsonl_path):
      files.rewrite_jsonl(self.jsonl_path, [r for r in read_records(self.jsonl_path)
                                            if r['step'] <= resume_step])
    logdir = os.path.join(workdir, 'tensorboard', '' if name == 'metrics' else name)
    # Imported here, not at the top: tensorboardX imports torch where it is installed
    # (seconds), which every process importing mmjax.train (the evaluators' too) would pay.
    import tensorboardX  # pylint: disable=g-import-not-at-top
    # purge_step: TensorBoard discards the earlier event files' events at steps >= it.
    self.tensorboard = tensorboardX.SummaryWriter(
        logdir, purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    scalars = {key: float(value) for key, value in metrics.items() if np.ndim(value) == 0}
    files.append_jsonl(self.jsonl_path, {'step': step, **scalars})
    for key, value in scalars.items():
      self.tensorboard.add_scalar(key, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      plot_curves(self.workdir)
      self.tensorboard.close()


def read_records(path: str) -> list[dict]:
  """The `{'step': ..., metric: value}` records of a metrics `.jsonl` file ([] if none; a
  torn last line is left out, see `files.read_jsonl`)."""
  return files.read_jsonl(path)


def plot_curves(workdir: str) -> list[str]:
  """Draws `loss_curve.png` (training loss) and `eval_curves.png` (accuracy / recall by
  step) from `metrics.jsonl` in `workdir`; returns the paths written."""
  records = read_records(os.path.join(workdir, 'metrics.jsonl'))
  paths = []
  loss = [(r['step'], r['train/loss']) for r in records if 'train/loss' in r]
  if loss:
    paths.append(_plot(os.path.join(workdir, 'loss_curve.png'), {'train/loss': loss},
                       'training loss'))
  curves = {}
  for record in records:
    for key, value in record.items():
      if key.endswith(_CURVE_SUFFIXES):
        curves.setdefault(key, []).append((record['step'], value))
  if curves:
    paths.append(_plot(os.path.join(workdir, 'eval_curves.png'), curves, 'eval metric'))
  return paths


def _plot(path: str, curves: dict[str, list], ylabel: str) -> str:
  figure = Figure(figsize=(7, 4.5))
  axis = figure.subplots()
  for label, points in sorted(curves.items()):
    steps, values = zip(*points)
    axis.plot(steps, values, marker='o' if len(points) < 20 else None, label=label)
  axis.set_xlabel('step')
  axis.set_ylabel(ylabel)
  axis.grid(alpha=0.3)
  if len(curves) > 1:
    axis.legend(fontsize=7)
  figure.tight_layout()
  with files.atomic_write(path, 'wb') as f:
    figure.savefig(f, dpi=100, format='png')
  return path
