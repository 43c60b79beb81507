"""The fault harness: a training run killed again and again, each time restarted with the
same command, ends exactly where an uninterrupted run ends.

`python -m mmjax.train` on the tiny CLIP config gets 10 SIGKILLs (during start-up, between
steps, and inside checkpoint writes, caught by watching for orbax's temporary directory) and
3 SIGTERMs, at moments drawn from a seeded generator. After each the same command runs
again; the last one finishes. The parameters must be bitwise those of an uninterrupted run,
and the example-id log the same sequence: no example lost or seen twice.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from mmjax import checkpoint
from mmjax import config_lib
from mmjax import train

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'clip.py') + ':tiny'
STEPS = 48
# What interrupts each run but the last, in order (shuffled with a fixed seed).
FAULTS = ['kill at start-up'] * 2 + ['kill between steps'] * 5 + ['kill inside a save'] * 3 + [
    'SIGTERM'] * 3


class _Run:
  """One `python -m mmjax.train` process, its printed step followed by a reader thread."""

  def __init__(self, command, env):
    self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
    self.step = -1
    self.lines = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stdout:
      self.lines.append(line)
      if line.startswith('step '):
        self.step = int(line.split()[1].split('/')[0])

  def wait_for(self, condition, timeout: float = 300) -> bool:
    """Polls `condition()` every millisecond until true (True) or the process ended (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      if condition():
        return True
      if self.process.poll() is not None:
        return False
      time.sleep(0.001)
    raise TimeoutError('the training process made no progress:\n' + ''.join(self.lines[-30:]))

  def finish(self, timeout: float = 600) -> str:
    self.process.wait(timeout)
    self._reader.join(10)
    return ''.join(self.lines)


def _saving(checkpoint_dir):
  return lambda: os.path.isdir(checkpoint_dir) and any(
      'tmp' in name for name in os.listdir(checkpoint_dir))


def _saved_steps(checkpoint_dir):
  return sorted(int(n) for n in os.listdir(checkpoint_dir) if n.isdigit()) if os.path.isdir(
      checkpoint_dir) else []


def test_kills_at_random_moments_lose_and_repeat_nothing(tmp_path, shared_data_dir):
  data_dir, workdir = shared_data_dir, tmp_path / 'interrupted'
  overrides = {'total_steps': STEPS, 'checkpoint_every': 4, 'log_every': 1, 'evals': {},
               'eval_every': 100000, 'record_example_ids': True, 'mesh.data': 2,
               'mesh.fsdp': 4, 'data.data_dir': data_dir}
  config = config_lib.load(TINY, overrides)
  straight, _ = train.run(config, str(tmp_path / 'straight'))  # also builds the data

  command = [sys.executable, '-m', 'mmjax.train', '--config', TINY, '--workdir', str(workdir),
             *(f'--config.{key}={value}' for key, value in overrides.items())]
  # Restarts compile from the persistent cache, as a restarted job on a cluster would.
  # (The test session's cache, tests/conftest.py, where it has one.)
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR') or str(tmp_path / 'compile_cache')
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  checkpoint_dir = str(workdir / 'checkpoints')
  rng = np.random.default_rng(21)
  faults = list(rng.permutation(FAULTS))
  log = []
  for fault in faults:
    saved = _saved_steps(checkpoint_dir)
    run = _Run(command, env)
    if fault == 'kill at start-up':
      time.sleep(rng.uniform(0.0, 6.0))
      alive = run.process.poll() is None
    elif fault == 'kill inside a save':
      alive = run.wait_for(_saving(checkpoint_dir))
    else:
      start = saved[-1] if saved else 0
      target = start + int(rng.integers(1, 7))
      alive = run.wait_for(lambda: run.step >= target)
      time.sleep(rng.uniform(0.0, 0.05))
    assert alive, f'finished before the fault {fault!r}:\n' + run.finish()
    if fault == 'SIGTERM':
      run.process.send_signal(signal.SIGTERM)
      output = run.finish()
      assert run.process.returncode == 0 and 'SIGTERM: saved step' in output, output
    else:
      run.process.kill()
      run.finish()
    log.append(f'{fault}: saved before {saved[-1:]}, after {_saved_steps(checkpoint_dir)[-1:]}')
  run = _Run(command, env)
  output = run.finish()
  assert run.process.returncode == 0, output

  # The newest checkpoint holds the uninterrupted run's state, bit for bit ...
  reader = checkpoint.CheckpointReader(checkpoint_dir)
  assert reader.resolve_step(None) == STEPS
  params = reader.numpy_params(STEPS)
  reader.close()
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(straight['params']))):
    np.testing.assert_array_equal(got, want)
  # ... after exactly its examples, in order: none lost, none repeated.
  ids = train.read_example_ids(str(workdir))
  want = train.read_example_ids(str(tmp_path / 'straight'))
  assert len(ids) == len(want) == STEPS and ids == want
  # orbax's atomic saves: a kill inside a save never left a damaged checkpoint behind.
  assert not os.path.exists(workdir / checkpoint.DAMAGED_DIR)
  print(f'{len(faults)} interruptions survived ({faults.count("SIGTERM")} SIGTERM), '
        f'0 examples lost or repeated:\n  ' + '\n  '.join(log))
