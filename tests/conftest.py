"""Test setup: 8 virtual CPU devices for mesh tests and the tests' XLA flags (both must
precede the first jax import), and one finished tiny CLIP run shared by the tests that only
need a trained workdir."""

import fcntl
import json
import os
import typing

import ml_collections
import pytest

# XLA:CPU without LLVM's optimisation of the generated code: the tests' programs are tiny
# and mostly compiled for a few steps, so compiling them takes most of the suite's time, and
# this halves it. The HLO passes (fusion, sharding propagation, collectives) still run as in
# training; results differ from the optimised code's only in float rounding. Processes the
# tests start inherit it, or take it from the `xla_flags` fixture with their device count.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), TEST_XLA_FLAGS,
                                    '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def xla_flags():
  """`xla_flags(n)`: XLA_FLAGS for a process the test starts: the tests' flags, n devices."""
  return lambda devices: f'{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}'


class TinyClipRun(typing.NamedTuple):
  config: ml_collections.ConfigDict
  workdir: str
  data_dir: str  # its datasets
  step: int  # the final step
  eval_metrics: dict[str, float]  # of the final evaluation


@pytest.fixture(scope='session')
def tiny_clip_run(tmp_path_factory) -> TinyClipRun:
  """`configs/clip.py:tiny` trained to its end (300 steps, evaluated at 150 and 300) on a
  data=2 x fsdp=4 mesh of the 8 devices.

  Trained once per test session: under pytest-xdist the first worker that needs it trains it
  in the session's temporary directory (common to the workers) while holding a lock, and the
  others wait for it and reuse it.
  """
  from mmjax import config_lib  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  from mmjax import train  # pylint: disable=g-import-not-at-top
  session_dir = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    session_dir = session_dir.parent  # pytest-N/popen-gwK -> pytest-N: this session's
  root = session_dir / 'tiny_clip_run'
  root.mkdir(exist_ok=True)
  data_dir, workdir, done = str(root / 'data'), str(root / 'run'), root / 'done.json'
  config = config_lib.load(os.path.join(REPO, 'configs', 'clip.py') + ':tiny', {
      'data.data_dir': data_dir, 'mesh.data': 2, 'mesh.fsdp': 4})
  with open(root / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      state, eval_metrics = train.run(config, workdir)
      done.write_text(json.dumps(dict(
          step=int(state['step']), eval_metrics={k: float(v) for k, v in eval_metrics.items()})))
    result = json.loads(done.read_text())
  return TinyClipRun(config, workdir, data_dir, result['step'], result['eval_metrics'])
