"""`experiments/device_check.py`: its batch search on made-up memory curves, the peak table,
and the `--dry-run` (the same code on CPU at tiny sizes) with every report field filled."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))

import device_check  # noqa: E402  (imports no jax: the parent process never starts a backend)


def search(needed, start, cap, available):
  calls = []

  def probe(batch):
    calls.append(batch)
    return needed(batch)

  batch, probes, predictions = device_check.search_batch(probe, start, cap, available,
                                                         log=lambda message: None)
  assert sorted(calls) == sorted(probes) and len(set(calls)) == len(calls)
  return batch, probes, predictions


def test_search_linear_memory():
  # fixed 100 + 10 per example, 1000 available: 64 fits (740), 128 (1380) is not probed.
  batch, probes, predictions = search(lambda b: 100 + 10 * b, 4, 1024, 1000)
  assert batch == 64
  assert sorted(probes) == [4, 8, 64]
  assert predictions == {128: 1380}


def test_search_superlinear_memory():
  # b^2: the linear fit overshoots, the probes come back down to the true answer.
  batch, probes, _ = search(lambda b: b * b, 4, 1024, 1000)
  assert batch == 16 and 16 in probes and not 32 * 32 <= 1000


def test_search_caps_and_start_too_large():
  assert search(lambda b: b, 4, 8, 1000)[0] == 8
  assert search(lambda b: b, 4, 4, 1000)[0] == 4
  batch, probes, _ = search(lambda b: 1000 * b, 4, 64, 1500)
  assert batch == 1 and sorted(probes) == [1, 2, 4]
  with pytest.raises(RuntimeError, match='batch 1 needs'):
    search(lambda b: 1000 * b, 4, 64, 500)


def test_peak_table():
  assert device_check.table_peak('NVIDIA H200') == ('H200', 989.0)
  assert device_check.table_peak('NVIDIA H100 PCIe') == ('H100 PCIe', 756.0)
  assert device_check.table_peak('NVIDIA H100 80GB HBM3') == ('H100', 989.0)
  assert device_check.table_peak('cpu') == (None, None)


def test_compile_options():
  assert device_check.compile_options([]) is None
  assert device_check.compile_options(
      ['xla_gpu_autotune_level=0', 'xla_gpu_enable_triton_gemm=false', 'name=abc']) == {
          'xla_gpu_autotune_level': 0, 'xla_gpu_enable_triton_gemm': False, 'name': 'abc'}
  with pytest.raises(ValueError, match='KEY=VALUE'):
    device_check.compile_options(['xla_gpu_autotune_level'])


@pytest.mark.slow
def test_dry_run_report(tmp_path, xla_flags):
  out = tmp_path / 'report.json'
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'experiments', 'device_check.py'), '--dry-run',
       '--out', str(out), '--compile-option', 'xla_gpu_autotune_level=0'], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  assert 'device check' in result.stdout and 'generate batch' in result.stdout
  report = json.loads(out.read_text())

  assert report['dry_run'] is True
  assert report['device']['backend'] == 'cpu'
  assert report['device']['memory_limit_bytes'] > 0
  assert report['matmul']['tflops'] > 0
  for phase in ('clip', 'decoder'):
    model = report[phase]
    assert 'error' not in model, model.get('error')
    batch = model['batch']
    assert batch >= 1 and batch & (batch - 1) == 0  # a power of two
    assert model['batch_search']['probes'] and batch <= model['batch_search']['cap']
    assert all(p['fits'] == (p['needed_bytes'] <= model['batch_search']['available_bytes'])
               for p in model['batch_search']['probes'])
    assert model['params'] > 0 and model['tokens_per_example'] > 0
    assert len(model['step_s_all']) == 3 and model['step_s'] > 0
    assert model['examples_per_s'] == pytest.approx(batch / model['step_s'])
    assert model['tokens_per_s'] == pytest.approx(
        batch * model['tokens_per_example'] / model['step_s'])
    assert math.isfinite(model['loss'])
    flops = model['flops']
    assert flops['xla_compiled'] > 0 and flops['model'] > 0
    # The unrolled HLO count and the 6N + attention estimate agree to within 15%.
    assert flops['model'] == pytest.approx(flops['six_n_attention'], rel=0.15)
    assert model['mfu_flops'] == 'model'
    assert model['mfu_vs_matmul'] > 0 and model['mfu_vs_table'] is None  # no CPU peak
    assert model['compiled_needed_bytes'] > 0
    assert 'peak_bytes_in_use' in model  # None on CPU
  assert report['clip']['compile_options'] == {'xla_gpu_autotune_level': 0}
  assert report['decoder']['flops']['six_n'] > 0
  rows = [(row['param_dtype'], row['batch']) for row in report['decoder']['generate']]
  assert rows == [('float32', 1), ('float32', 4), ('bfloat16', 1)]
  assert all(row['tokens_per_s'] > 0 and row['new'] == 8 for row in report['decoder']['generate'])
