"""Metrics to `<name>.jsonl`, TensorBoard event files, and curve PNGs in the workdir."""

import json
import os

from matplotlib.figure import Figure  # No pyplot: no global backend is chosen or needed.
import numpy as np
import tensorboardX

# Eval metrics worth a curve: accuracy and recall at the first rank.
_CURVE_SUFFIXES = ('top1', 'top5', 'R@1', 'R@5')


class MetricsWriter:
  """Writes scalars by step into the workdir (only where `enabled`, i.e. on host 0).

  name: 'metrics' for training (`metrics.jsonl`, `tensorboard/`), e.g. 'eval_metrics' for
  a separate evaluation run (`eval_metrics.jsonl`, `tensorboard/eval_metrics/`).
  """

  def __init__(self, workdir: str, *, name: str = 'metrics', enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, f'{name}.jsonl')
    logdir = os.path.join(workdir, 'tensorboard', '' if name == 'metrics' else name)
    self.tensorboard = tensorboardX.SummaryWriter(logdir) if enabled else None

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (left by a run that died after its last checkpoint)."""
    if not self.enabled or not os.path.exists(self.jsonl_path):
      return
    kept = [r for r in read_records(self.jsonl_path) if r['step'] <= step]
    with open(self.jsonl_path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    scalars = {key: float(value) for key, value in metrics.items() if np.ndim(value) == 0}
    with open(self.jsonl_path, 'a') as f:
      f.write(json.dumps({'step': step, **scalars}) + '\n')
    for key, value in scalars.items():
      self.tensorboard.add_scalar(key, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      plot_curves(self.workdir)
      self.tensorboard.close()


def read_records(path: str) -> list[dict]:
  """The `{'step': ..., metric: value}` records of a metrics `.jsonl` file."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


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
  figure.savefig(path, dpi=100)
  return path
