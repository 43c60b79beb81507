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

# JAX's persistent compilation cache, shared by the xdist workers and the processes the tests
# start (they inherit the environment): most tests compile the same few tiny programs (a
# tiny config's train step, on the same meshes), and compiling is most of the suite's time.
# An entry's key is the program's HLO, the compile options, the XLA flags, the devices and
# the jax version, so a changed program compiles anew; a cached one is the same executable.
# JAX_COMPILATION_CACHE_DIR= (empty) turns it off.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(REPO, '.pytest_cache', 'jax_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')


@pytest.fixture
def xla_flags():
  """`xla_flags(n)`: XLA_FLAGS for a process the test starts: the tests' flags, n devices."""
  return lambda devices: f'{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}'


def _session_dir(tmp_path_factory):
  """The session's temporary directory, common to its xdist workers (pytest-N)."""
  path = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    path = path.parent  # pytest-N/popen-gwK -> pytest-N: this session's
  return path


@pytest.fixture(scope='session')
def shared_data_dir(tmp_path_factory) -> str:
  """One datasets directory for the whole session, its xdist workers and the processes the
  tests start: each dataset is built there once, on first use (`pipeline.build` holds a
  lock, so a second worker waits for the first one's build), then only read. Building the
  emoji dataset takes ~30 s of CPU; a test that damages data, or must see a build happen,
  takes its own directory instead."""
  return str(_session_dir(tmp_path_factory) / 'datasets')


class TinyClipRun(typing.NamedTuple):
  config: ml_collections.ConfigDict
  workdir: str
  data_dir: str  # its datasets
  step: int  # the final step
  eval_metrics: dict[str, float]  # of the final evaluation


@pytest.fixture(scope='session')
def tiny_clip_run(tmp_path_factory, shared_data_dir) -> TinyClipRun:
  """`configs/clip.py:tiny` trained to its end (300 steps, evaluated at 150 and 300) on a
  data=2 x fsdp=4 mesh of the 8 devices.

  Trained once per test session: under pytest-xdist the first worker that needs it trains it
  in the session's temporary directory (common to the workers) while holding a lock, and the
  others wait for it and reuse it.
  """
  from mmjax import config_lib  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  from mmjax import train  # pylint: disable=g-import-not-at-top
  root = _session_dir(tmp_path_factory) / 'tiny_clip_run'
  root.mkdir(exist_ok=True)
  data_dir, workdir, done = shared_data_dir, str(root / 'run'), root / 'done.json'
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
