"""Two processes on localhost (4 CPU devices each, gloo collectives) train exactly like one
process with 8 devices, and a checkpoint written by the two restores in one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmjax import checkpoint
from mmjax import config_lib
from mmjax import metrics_writer
from mmjax import sharding
from mmjax import train

pytestmark = [pytest.mark.multihost, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'clip.py') + ':tiny'
OVERRIDES = {'total_steps': 12, 'log_every': 1, 'eval_every': 12, 'checkpoint_every': 6,
             'mesh.fsdp': 2}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _train_two_processes(workdir, data_dir, xla_flags):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  flags = [f'--config.{key}={value}' for key, value in OVERRIDES.items()]
  processes = [subprocess.Popen(
      [sys.executable, '-m', 'mmjax.train', f'--config={TINY}', f'--workdir={workdir}',
       f'--config.data.data_dir={data_dir}', *flags, f'--coordinator=localhost:{port}',
       '--num_processes=2', f'--process_id={rank}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for rank in (0, 1)]
  outputs = [p.communicate(timeout=900) for p in processes]
  for rank, (p, (out, err)) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, f'process {rank} failed:\n{err[-4000:]}'
  return outputs


def test_two_processes_equal_one_process(tmp_path, xla_flags):
  data_dir = str(tmp_path / 'data')
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  (out0, _), (out1, _) = _train_two_processes(two, data_dir, xla_flags(4))
  assert "mesh {'data': 4, 'fsdp': 2, 'tensor': 1}" in out0
  assert 'step' not in out1  # Only process 0 logs.

  config = config_lib.load(TINY, {'data.data_dir': data_dir, **OVERRIDES})
  assert len(jax.devices()) == 8
  _, one_eval = train.run(config, one)

  records = {name: metrics_writer.read_records(os.path.join(d, 'metrics.jsonl'))
             for name, d in (('one', one), ('two', two))}
  losses = {name: [r['train/loss'] for r in recs if 'train/loss' in r]
            for name, recs in records.items()}
  assert len(losses['two']) == 12
  np.testing.assert_allclose(losses['two'], losses['one'], rtol=1e-5)
  two_eval = {k: v for k, v in records['two'][-1].items() if k.startswith('zeroshot/')}
  for key, value in two_eval.items():
    assert value == pytest.approx(one_eval[key], abs=1e-6), key
  # Each process wrote its own data-iterator state beside the shared state.
  assert os.listdir(os.path.join(two, 'checkpoints', '12'))

  # The 2-process checkpoint restores in this one process (state and data position) like the
  # 1-process one; that a restored run then trains exactly on is test_train's SIGTERM test.
  state_one, batch_one = _restore(config, one, 12)
  state_two, batch_two = _restore(config, two, 12)
  # Float32 tolerance relative to the largest parameter: sums run in another order, and some
  # parameters (the key biases) are zero in theory and noise around 1e-6 in practice.
  scale = max(float(np.abs(p).max()) for p in jax.tree.leaves(state_one['params']))
  assert int(state_two['step']) == int(state_one['step']) == 12
  for a, b in zip(jax.tree.leaves(state_two), jax.tree.leaves(state_one)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_array_equal(batch_two['example_id'], batch_one['example_id'])


def _restore(config, workdir, step):
  """(state at `step` restored on all 8 devices, the next batch of the rewound iterator)."""
  mesh = sharding.make_mesh(config.mesh)
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    data = trainer.task.train_iterator(process_index=0, process_count=1)
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=2)
    state = checkpointer.restore(step, trainer.abstract_state, data)
    checkpointer.close()
  return jax.device_get(state), next(data)
