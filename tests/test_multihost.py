"""Two processes on localhost (4 CPU devices each, gloo collectives) train exactly like one
process with 8 devices; a run resumes across process counts (2 -> 1 and 1 -> 2, with grain
worker processes) and trains on; SIGTERM to one process first stops both at the same step."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from mmjax import checkpoint
from mmjax import config_lib
from mmjax import files
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


def _start_two_processes(workdir, data_dir, xla_flags, overrides=None, extra_flags=()):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  flags = [f'--config.{key}={value}' for key, value in (overrides or OVERRIDES).items()]
  return [subprocess.Popen(
      [sys.executable, '-m', 'mmjax.train', f'--config={TINY}', f'--workdir={workdir}',
       f'--config.data.data_dir={data_dir}', *flags, *extra_flags,
       f'--coordinator=localhost:{port}', '--num_processes=2', f'--process_id={rank}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for rank in (0, 1)]


def _train_two_processes(workdir, data_dir, xla_flags, overrides=None, extra_flags=()):
  processes = _start_two_processes(workdir, data_dir, xla_flags, overrides, extra_flags)
  outputs = [p.communicate(timeout=900) for p in processes]
  for rank, (p, (out, err)) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, f'process {rank} failed:\n{err[-4000:]}'
  return outputs


def test_two_processes_equal_one_process(tmp_path, xla_flags, shared_data_dir):
  data_dir = shared_data_dir
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


RESUME = {'total_steps': 8, 'log_every': 1, 'checkpoint_every': 100, 'evals': {},
          'record_example_ids': True, 'data.worker_count': 1, 'mesh.fsdp': 2}


def _iterator_states(step_dir):
  return sorted(n for n in os.listdir(os.path.join(step_dir, 'data')) if n.startswith('process'))


def _global_ids(workdir, processes, steps):
  """The global batch of example ids of each of `steps`: the processes' logged blocks of it,
  in process order."""
  logs = [{record['step']: record['ids'] for record in files.read_jsonl(
      os.path.join(workdir, f'example_ids.{p}.jsonl'))} for p in range(processes)]
  return [sum((log[step] for log in logs), []) for step in steps]


def _assert_close_states(got, want):
  # As in test_two_processes_equal_one_process: float sums in another order.
  scale = max(float(np.abs(p).max()) for p in jax.tree.leaves(want['params']))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)


def test_resume_across_process_counts_trains_on(tmp_path, xla_flags, shared_data_dir):
  """2 -> 1 and 1 -> 2 processes at step 4 of 8, with a grain worker process per host: the
  resumed runs see exactly the uninterrupted run's examples and end at its parameters."""
  data_dir = shared_data_dir
  config = config_lib.load(TINY, {'data.data_dir': data_dir, **RESUME})
  straight, _ = train.run(config, str(tmp_path / 'straight'))
  want_ids = train.read_example_ids(str(tmp_path / 'straight'))
  assert len(want_ids) == 8

  # 2 -> 1: two processes stop at step 4; this process resumes and trains to 8.
  two_one = str(tmp_path / 'two_one')
  _train_two_processes(two_one, data_dir, xla_flags(4), RESUME, ['--stop_at_step=4'])
  assert _iterator_states(os.path.join(two_one, 'checkpoints', '4')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
  shutil.copytree(two_one, two_one + '_first_leg')
  resumed, _ = train.run(config, two_one)
  _assert_close_states(jax.device_get(resumed), jax.device_get(straight))
  first_leg = _global_ids(two_one + '_first_leg', 2, range(4))
  assert first_leg + train.read_example_ids(two_one)[4:] == want_ids

  # 1 -> 2: this process stops at step 4; two processes resume and train to 8.
  one_two = str(tmp_path / 'one_two')
  train.run(config, one_two, stop_at_step=4)
  _train_two_processes(one_two, data_dir, xla_flags(4), RESUME)
  state, _ = _restore(config, one_two, 8)
  _assert_close_states(state, jax.device_get(straight))
  ids = train.read_example_ids(one_two, 0)  # steps 0-3 by one process: whole batches
  assert ids[:4] + _global_ids(one_two, 2, range(4, 8)) == want_ids


def test_sigterm_to_one_process_first_stops_both_at_the_same_step(tmp_path, xla_flags, shared_data_dir):
  workdir = str(tmp_path / 'run')
  overrides = dict(RESUME, total_steps=400, **{'data.worker_count': 0})
  processes = _start_two_processes(workdir, shared_data_dir, xla_flags(4), overrides)
  ids_files = [os.path.join(workdir, f'example_ids.{rank}.jsonl') for rank in (0, 1)]
  steps_logged = lambda rank: (len(open(ids_files[rank]).read().splitlines())
                               if os.path.exists(ids_files[rank]) else 0)
  deadline = time.time() + 600
  while steps_logged(1) < 5 and time.time() < deadline and processes[1].poll() is None:
    time.sleep(0.02)
  processes[1].send_signal(signal.SIGTERM)  # process 1 alone ...
  first_signal_step = steps_logged(1)
  # ... and process 0 a few steps later (or never, if both have stopped by then).
  timer = threading.Timer(0.5, lambda: processes[0].poll() is None and processes[0].send_signal(
      signal.SIGTERM))
  timer.start()
  outputs = [p.communicate(timeout=600) for p in processes]
  timer.cancel()
  for rank, (p, (out, err)) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, f'process {rank} failed:\n{err[-4000:]}'
  saved = int(outputs[0][0].split('SIGTERM: saved step')[1].split(',')[0])
  assert first_signal_step <= saved < 400
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(saved)]
  assert _iterator_states(os.path.join(workdir, 'checkpoints', str(saved))) == [
      'process_0-of-2.json', 'process_1-of-2.json']
  assert steps_logged(0) == steps_logged(1) == saved  # both trained exactly to that step
