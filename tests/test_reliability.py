"""Training survives what a real run meets: non-finite steps, damaged checkpoints, torn log
lines, and resumes that would silently change what the checkpoint means.

One tiny CLIP run to step 4 (checkpoints at 2 and 4) and one uninterrupted run to step 6 are
shared; each test works on its own copy of the first.
"""

import glob
import os
import shutil
import struct

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from mmjax import checkpoint
from mmjax import config_lib
from mmjax import files
from mmjax import metrics_writer
from mmjax import sharding
from mmjax import train
from mmjax.data import pipeline

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'clip.py') + ':tiny'


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


def _config(data_dir, **overrides):
  return config_lib.load(TINY, {
      'data.data_dir': data_dir, 'total_steps': 6, 'checkpoint_every': 2, 'log_every': 1,
      'evals': {}, 'record_example_ids': True, **overrides})


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
  """(workdir stopped at step 4 with checkpoints 2 and 4, final params of a run to 6, the
  example ids of that run)."""
  root = tmp_path_factory.mktemp('runs')
  config = _config(data_dir)
  train.run(config, str(root / 'at4'), stop_at_step=4)
  straight, _ = train.run(config, str(root / 'straight'))
  return str(root / 'at4'), jax.device_get(straight), train.read_example_ids(
      str(root / 'straight'))


def _copy(workdir, tmp_path):
  target = str(tmp_path / 'run')
  shutil.copytree(workdir, target)
  return target


def _assert_equal_states(got, want):
  for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _restore_latest(config, workdir):
  mesh = sharding.make_mesh(config.mesh)
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    data = trainer.task.train_iterator(process_index=0, process_count=1)
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=2)
    try:
      return checkpointer.restore_latest(trainer.abstract_state, data)
    finally:
      checkpointer.close()


def _largest_array_file(step_dir):
  paths = glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd', '*'))
  return max(paths, key=os.path.getsize)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    'array file truncated': lambda step_dir: _truncate(_largest_array_file(step_dir)),
    'array file deleted': lambda step_dir: os.remove(_largest_array_file(step_dir)),
    'iterator state truncated': lambda step_dir: _truncate(
        os.path.join(step_dir, 'data', 'process_0-of-1.json')),
    'iterator state deleted': lambda step_dir: os.remove(
        os.path.join(step_dir, 'data', 'process_0-of-1.json')),
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(runs, data_dir, tmp_path, damage):
  workdir = _copy(runs[0], tmp_path)
  DAMAGE[damage](os.path.join(workdir, 'checkpoints', '4'))
  restored = _restore_latest(_config(data_dir), workdir)
  assert restored.step == 2
  assert len(restored.skipped) == 1 and restored.skipped[0].startswith('step 4: ')
  # Set aside, not deleted, and out of the way of the next save of step 4.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
  assert os.listdir(os.path.join(workdir, checkpoint.DAMAGED_DIR)) == ['4']


def test_resume_past_a_damaged_checkpoint_equals_an_uninterrupted_run(runs, data_dir, tmp_path,
                                                                      capsys):
  workdir = _copy(runs[0], tmp_path)
  _truncate(_largest_array_file(os.path.join(workdir, 'checkpoints', '4')))
  capsys.readouterr()
  state, _ = train.run(_config(data_dir), workdir)
  output = capsys.readouterr().out
  assert 'Checkpoint step 4: ' in output and 'Resumed from step 2 ' in output, output
  _assert_equal_states(state, runs[1])
  assert train.read_example_ids(workdir) == runs[2]


def test_no_checkpoint_restores_names_each_and_moves_none(runs, data_dir, tmp_path):
  workdir = _copy(runs[0], tmp_path)
  for step in ('2', '4'):
    os.remove(os.path.join(workdir, 'checkpoints', step, 'data', 'process_0-of-1.json'))
  with pytest.raises(ValueError, match=r'no checkpoint .* restores:\n  step 4: .*\n  step 2: '):
    _restore_latest(_config(data_dir), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def _events(path):
  """The `Event` records of a TensorBoard event file (TFRecord framing)."""
  events = []
  with open(path, 'rb') as f:
    while header := f.read(12):
      (length,) = struct.unpack('<Q', header[:8])
      event = event_pb2.Event()
      event.ParseFromString(f.read(length))
      f.read(4)  # the data's CRC
      events.append(event)
  return events


def test_logs_torn_by_a_kill_resume_without_loss_or_repeats(runs, data_dir, tmp_path):
  """A kill after step 5 was logged but before its checkpoint, and inside the next append."""
  workdir = _copy(runs[0], tmp_path)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  files.append_jsonl(metrics_path, {'step': 5, 'train/loss': 1.0})
  ids_path = os.path.join(workdir, 'example_ids.0.jsonl')
  files.append_jsonl(ids_path, {'step': 4, 'ids': [1, 2]})
  for path in (metrics_path, ids_path):
    with open(path, 'a') as f:
      f.write('{"step": 6, "tr')
  state, _ = train.run(_config(data_dir), workdir)

  _assert_equal_states(state, runs[1])
  assert train.read_example_ids(workdir) == runs[2]
  steps = [r['step'] for r in metrics_writer.read_records(metrics_path)]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert open(metrics_path).read().endswith('\n')
  # The resumed writer told TensorBoard to drop the first run's events from step 5 on.
  event_files = sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.*')),
                       key=os.path.getmtime)
  assert len(event_files) == 2
  starts = [e for e in _events(event_files[-1]) if e.HasField('session_log')]
  assert [(e.session_log.status, e.step) for e in starts] == [(event_pb2.SessionLog.START, 5)]


def test_a_complete_line_that_is_not_json_is_named(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  with open(path, 'w') as f:
    f.write('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl, line 2: not a JSON record'):
    files.read_jsonl(path)


@pytest.mark.parametrize('overrides,named', [
    ({'batch_size': 32}, 'batch_size: 64 -> 32'),
    ({'seed': 1}, 'seed: 0 -> 1'),
    ({'data.max_text_len': 12}, 'data.max_text_len:'),
])
def test_resume_that_changes_the_data_position_meaning_is_refused(runs, data_dir, tmp_path,
                                                                   overrides, named):
  workdir = _copy(runs[0], tmp_path)
  config = _config(data_dir, **overrides)
  with pytest.raises(ValueError, match='refusing to resume from step 4') as error:
    train.run(config, workdir)
  assert named in str(error.value) and '--allow_config_change' in str(error.value)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']  # untouched
  # Allowed on request (stop_at_step=4: nothing to train; it resumes and saves nothing new).
  state, _ = train.run(config, workdir, stop_at_step=4, allow_config_change=True)
  assert int(state['step']) == 4


def test_resume_on_other_training_data_is_refused(runs, data_dir, tmp_path, monkeypatch):
  """E.g. a machine where an apt package drew the dataset differently: another content hash."""
  workdir = _copy(runs[0], tmp_path)
  identity = pipeline.dataset_identity
  monkeypatch.setattr(pipeline, 'dataset_identity',
                      lambda *args: dict(identity(*args), train_sha256='0' * 64))
  with pytest.raises(ValueError, match=r'training data digits.train_sha256: .* -> \'0000'):
    train.run(_config(data_dir), workdir)


def test_allowed_changes_resume(runs, data_dir, tmp_path, capsys):
  workdir = _copy(runs[0], tmp_path)
  train.run(_config(data_dir, total_steps=8, log_every=2, **{'mesh.fsdp': 2, 'mesh.data': 4}),
            workdir, stop_at_step=4)
  assert 'total_steps: 6 -> 8' in capsys.readouterr().out


def test_nonfinite_step_stops_the_run_naming_it_and_saves_nothing_after(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  config = _config(data_dir, inject_nonfinite_at_step=3, log_every=10)
  with pytest.raises(FloatingPointError, match=r'^step 3: .*not finite.*after step 2'):
    train.run(config, workdir)
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']


def test_nonfinite_step_is_skipped_and_counted_under_skip(data_dir, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  config = _config(data_dir, inject_nonfinite_at_step=3, nonfinite='skip')
  state, _ = train.run(config, workdir)
  assert int(state['step']) == 6 and int(state['nonfinite_steps']) == 1
  assert int(state['first_nonfinite_step']) == 3
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state['params']))
  records = metrics_writer.read_records(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['train/nonfinite_steps'] for r in records] == [0, 0, 1, 1, 1, 1]
  assert '1 non-finite steps skipped' in capsys.readouterr().out
