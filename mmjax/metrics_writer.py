"""Training metrics to `metrics.jsonl`, TensorBoard event files and a loss-curve PNG."""

import json
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorboardX


class MetricsWriter:
  """Writes scalars by step into the workdir (only where `enabled`, i.e. on host 0)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    self.png_path = os.path.join(workdir, 'loss_curve.png')
    self.tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard')) \
        if enabled else None

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (left by a run that died after its last checkpoint)."""
    if not self.enabled or not os.path.exists(self.jsonl_path):
      return
    with open(self.jsonl_path) as f:
      kept = [line for line in f if json.loads(line)['step'] <= step]
    with open(self.jsonl_path, 'w') as f:
      f.writelines(kept)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    scalars = {key: float(value) for key, value in metrics.items() if np.ndim(value) == 0}
    with open(self.jsonl_path, 'a') as f:
      f.write(json.dumps({'step': step, **scalars}) + '\n')
    for key, value in scalars.items():
      self.tensorboard.add_scalar(key, value, step)
    self.tensorboard.flush()

  def plot_loss(self) -> None:
    """Training loss against step, from every record in `metrics.jsonl`."""
    if not os.path.exists(self.jsonl_path):
      return
    with open(self.jsonl_path) as f:
      records = [json.loads(line) for line in f]
    points = [(r['step'], r['train/loss']) for r in records if 'train/loss' in r]
    if not points:
      return
    steps, losses = zip(*points)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(steps, losses)
    axis.set_xlabel('step')
    axis.set_ylabel('training loss')
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(self.png_path, dpi=100)
    plt.close(figure)

  def close(self) -> None:
    if self.enabled:
      self.plot_loss()
      self.tensorboard.close()
