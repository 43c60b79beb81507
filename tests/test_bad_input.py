"""The bad-input corpus: each mistake a user can make against a finished run gets an error
that names the key, file or line, and leaves every file of the run byte for byte as it was.

The errors of the other inputs have their own tests: generation prompts (tests/test_generate.py,
tests/test_flamingo.py), Hugging Face directories (tests/test_convert_errors.py), the ring
losses without a mesh (tests/test_ring_losses.py), the config keys of every family
(tests/test_config_validation.py), damaged checkpoints (tests/test_reliability.py).
"""

import hashlib
import os
import shutil

import pytest

from mmjax import config_lib
from mmjax import evaluate
from mmjax import train

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'clip.py') + ':tiny'

# (overrides of the run's config, what the error must say)
BAD_CONFIGS = {
    'grad_accum_steps=0': ({'grad_accum_steps': 0}, r'config\.grad_accum_steps=0 must be'),
    'log_every=0': ({'log_every': 0}, r'config\.log_every=0 must be'),
    'eval_every=0': ({'eval_every': 0}, r'config\.eval_every=0 must be'),
    'checkpoint_every=0': ({'checkpoint_every': 0}, r'config\.checkpoint_every=0 must be'),
    'misspelled data.name': ({'data.name': 'digitz'}, r"config\.data\.name='digitz'"),
    'mesh smaller than the devices': ({'mesh.data': 4}, r'config\.mesh'),
    'unknown nonfinite policy': ({'nonfinite': 'ignore'}, r"config\.nonfinite='ignore'"),
    'trainable matching nothing': ({'trainable': 'towers/.*'}, r"config\.trainable='towers/\.\*'"),
    'resume with another batch_size': ({'batch_size': 32},
                                       r'refusing to resume .* batch_size: 64 -> 32'),
    'resume with another seed': ({'seed': 3}, r'refusing to resume .* seed: 0 -> 3'),
}


def _snapshot(workdir):
  """{relative path: sha256} of every file under `workdir`."""
  digests = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        digests[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return digests


@pytest.fixture
def finished_run(tiny_clip_run, tmp_path):
  """A private copy of the session's finished tiny CLIP run, and its files' digests."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_clip_run.workdir, workdir)
  return workdir, _snapshot(workdir)


def _config(tiny_clip_run, overrides):
  return config_lib.load(TINY, {'data.data_dir': tiny_clip_run.data_dir, 'mesh.data': 2,
                                'mesh.fsdp': 4, **overrides})


@pytest.mark.parametrize('case', sorted(BAD_CONFIGS))
def test_bad_config_is_named_and_the_run_is_untouched(tiny_clip_run, finished_run, case):
  workdir, before = finished_run
  overrides, message = BAD_CONFIGS[case]
  with pytest.raises(ValueError, match=message):
    train.run(_config(tiny_clip_run, overrides), workdir)
  assert _snapshot(workdir) == before


def test_unknown_config_key_is_named():
  with pytest.raises(KeyError, match=r"config has no key 'mesh\.dtaa'"):
    config_lib.load(TINY, {'mesh.dtaa': 2})


def test_damaged_metrics_log_is_named_and_left_as_it_is(tiny_clip_run, finished_run):
  workdir, _ = finished_run
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) as f:
    lines = f.readlines()
  lines[1] = lines[1][:10] + '\n'  # damage inside the file, not a torn last line
  with open(path, 'w') as f:
    f.writelines(lines)
  before = _snapshot(workdir)
  with pytest.raises(ValueError, match=r'metrics\.jsonl, line 2: not a JSON record'):
    train.run(_config(tiny_clip_run, {}), workdir)
  assert _snapshot(workdir) == before


def test_evaluate_with_a_bad_config_writes_nothing(tiny_clip_run, finished_run):
  workdir, before = finished_run
  with pytest.raises(ValueError, match=r"config\.data\.name='digitz'"):
    evaluate.run(workdir, config=_config(tiny_clip_run, {'data.name': 'digitz'}))
  assert _snapshot(workdir) == before
