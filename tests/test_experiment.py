"""The experiment runner: a grid's arms and names, the table's statistics, and on a tiny grid
run as `python -m mmjax.experiment`: a killed grid resumes without redoing finished runs, and
its table holds exactly what each run's own `mmjax.evaluate` reports."""

import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from mmjax import evaluate
from mmjax import experiment
from mmjax import tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENT = '''
import ml_collections

def get_config():
  return ml_collections.ConfigDict(dict(
      base='configs/clip.py:tiny',
      overrides=dict(total_steps=12, eval_every=12, checkpoint_every=6, log_every=6,
                     data=dict(data_dir={data_dir!r})),
      grid=dict(lr=(1e-3, 3e-3)),
      seeds=(0, 1),
      metrics=('zeroshot/test/top1', 'zeroshot/test/top5'),
  ))
'''


def _write(tmp_path, text):
  path = tmp_path / 'tiny_grid.py'
  path.write_text(text)
  return str(path)


def test_arms_cross_named_arms_with_the_grid(tmp_path):
  path = _write(tmp_path, '''
import ml_collections
def get_config():
  return ml_collections.ConfigDict(dict(
      base='configs/clip.py:tiny', seeds=(0,), metrics=('m',),
      arms=dict(vit=dict(model=dict(image=dict(width=32))), wide=dict(lr=1.0)),
      grid=dict(batch_size=(16, 32), model=dict(text=dict(depth=(1,)))),
  ))
''')
  arms = experiment.arms(experiment.load(path))
  assert arms == {
      'vit,batch_size=16,depth=1': {'model.image.width': 32, 'batch_size': 16,
                                    'model.text.depth': 1},
      'vit,batch_size=32,depth=1': {'model.image.width': 32, 'batch_size': 32,
                                    'model.text.depth': 1},
      'wide,batch_size=16,depth=1': {'lr': 1.0, 'batch_size': 16, 'model.text.depth': 1},
      'wide,batch_size=32,depth=1': {'lr': 1.0, 'batch_size': 32, 'model.text.depth': 1},
  }
  runs = experiment.plan(experiment.load(path), '/w')
  assert runs[0].workdir == '/w/vit,batch_size-16,depth-1/seed_0'


def test_unknown_or_missing_experiment_keys_are_named(tmp_path):
  path = _write(tmp_path, 'import ml_collections\ndef get_config():\n  return '
                'ml_collections.ConfigDict(dict(base="configs/clip.py:tiny", seeds=(0,), '
                'metrics=("m",), gird=dict(lr=(1.0,))))\n')
  with pytest.raises(KeyError, match=r"unknown experiment keys \['gird'\]"):
    experiment.load(path)
  path = _write(tmp_path, 'import ml_collections\ndef get_config():\n  return '
                'ml_collections.ConfigDict(dict(base="configs/clip.py:tiny", metrics=("m",)))\n')
  with pytest.raises(KeyError, match=r"'seeds' is missing or empty"):
    experiment.load(path)


def test_table_states_mean_spread_and_which_arms_are_apart():
  results = [{'arm': arm, 'seed': seed, 'metrics': {'acc': value}}
             for arm, values in (('a', (0.50, 0.54)), ('b', (0.40, 0.41)), ('c', (0.49, 0.60)))
             for seed, value in enumerate(values)]
  config = ml_collections.ConfigDict(dict(
      base='x', seeds=(0, 1), metrics=('acc',), arms=dict(a={}, b={}, c={})))
  summary = experiment.summarize(config, results)
  assert summary['acc']['a']['mean'] == pytest.approx(0.52)
  assert summary['acc']['a']['std'] == pytest.approx(np.std([0.50, 0.54], ddof=1))
  text = experiment.table(summary, title='t')
  assert '| a | 0.5200 ± 0.0283 (2) |' in text
  # c is best (0.545); a's range [0.50, 0.54] overlaps c's [0.49, 0.60]; b's does not.
  assert '- `acc`: best c (0.5450); below it beyond the seed spread: b; within it: a.' in text
  # As a loss, b is best (0.405) and both others' ranges lie above its [0.40, 0.41].
  text = experiment.table(summary, title='t', lower_is_better=('acc',))
  assert '- `acc`: best b (0.4050); above it beyond the seed spread: a, c; within it: none.' in text


def _start(path, workdir, *flags):
  return subprocess.Popen(
      [sys.executable, '-m', 'mmjax.experiment', path, f'--workdir={workdir}', *flags],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_grid_resumes_and_its_table_is_what_evaluate_reports(tmp_path, shared_data_dir):
  path = _write(tmp_path, EXPERIMENT.format(data_dir=shared_data_dir))
  workdir = tmp_path / 'grid'
  runs = experiment.plan(experiment.load(path), str(workdir))
  first = runs[0]

  # Kill the runner once the first run is finished and the second has started.
  process = _start(path, workdir)
  deadline = time.time() + 600
  while time.time() < deadline and process.poll() is None and not os.path.isdir(
      os.path.join(runs[1].workdir, 'checkpoints')):
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert first.done() and not runs[-1].done()
  finished_at = os.path.getmtime(first.result_path)

  # One arm alone (a cluster job per arm): its two seeds; the table lists what is missing.
  process = _start(path, workdir, '--arm=lr=0.003')
  output, _ = process.communicate(timeout=900)
  assert process.returncode == 0, output
  assert '[1/2] lr=0.003 seed 0: training' in output
  assert 'Not finished yet (1 of 4 runs): lr=0.001 seed 1' in (workdir / 'results.md').read_text()

  process = _start(path, workdir)
  output, _ = process.communicate(timeout=900)
  assert process.returncode == 0, output
  assert f'[1/4] {first.arm} seed 0: done' in output
  assert '[4/4] lr=0.003 seed 1: done' in output and output.count(': training in') == 1
  assert os.path.getmtime(first.result_path) == finished_at  # not redone
  assert 'Not finished' not in (workdir / 'results.md').read_text()

  with open(workdir / 'results.json') as f:
    summary = json.load(f)['summary']
  markdown = (workdir / 'results.md').read_text()
  assert (workdir / 'results.png').stat().st_size > 0
  for arm in ('lr=0.001', 'lr=0.003'):
    reported = {}
    for run in (r for r in runs if r.arm == arm):
      _, metrics, _ = evaluate.run(run.workdir)
      for metric in ('zeroshot/test/top1', 'zeroshot/test/top5'):
        reported.setdefault(metric, []).append(metrics[metric])
    cells = []
    for metric, values in reported.items():
      assert summary[metric][arm]['values'] == pytest.approx(values, abs=1e-7), (arm, metric)
      cells.append(f'{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} (2)')
    assert f'| {arm} | ' + ' | '.join(cells) + ' |' in markdown


@pytest.mark.parametrize('name', ['clip_small_recipe', 'image_tower', 'siglip_vs_softmax',
                                  'vq_codebook'])
def test_shipped_experiment_files_give_valid_configs(name, tmp_path):
  """Every run of a shipped experiment file builds a config that validates, so a typo in an
  arm fails here, not an hour into a grid."""
  spec = experiment.load(os.path.join(REPO, 'experiments', f'{name}.py'))
  runs = experiment.plan(spec, str(tmp_path))
  assert runs
  for run in runs:
    config = experiment.run_config(spec, run)
    tasks.validate_config(config, 1)
    for key, value in run.overrides.items():  # the arm's overrides reached the config
      assert experiment.flatten(config.to_dict())[key] == value, (run.arm, key)
