r"""What a config's train step costs on a mesh: compile time, memory, FLOPs, communication, MFU.

  python experiments/bench_scale.py --config configs/clip.py:small --devices 8 \
      --config.mesh.data=2 --config.mesh.fsdp=4
  python experiments/bench_scale.py --config configs/clip.py:small --devices 8 \
      --config.mesh.fsdp=8 --config.model.scan_unroll=False --depths 2,24  # compile time
                                                              # against depth (nn.scan)

Prints, for the jitted train step of `mmjax.train.Trainer` (the program training runs):
- compile time (lower + compile), per `--depths` value if given (image and text depth);
- per-device memory from `compiled.memory_analysis()` (arguments, outputs, temporaries);
- FLOPs per device from `compiled.cost_analysis()`;
- every collective in the compiled HLO with the bytes each device sends/receives per step
  (loop bodies counted `known_trip_count` times; ring algorithms: all-gather and all-to-all
  (g-1)/g x result, reduce-scatter (g-1) x result, all-reduce 2(g-1)/g x size,
  collective-permute its size), against the theoretical minimum for the mesh's strategy:
  data parallel all-reduces the gradients (2(d-1)/d x P); FSDP all-gathers the parameters
  in the forward and again in the backward pass and reduce-scatters the gradients
  (3(f-1)/f x P), then all-reduces the fsdp-sharded gradients over `data` (2(d-1)/d x P/f);
  P = parameter bytes. The tensor axis is not in this formula (its traffic is activations);
- the measured step time and the model-FLOPs utilisation against `--peak_tflops` (per
  device) or, if not given, a large matmul measured on device 0. On CPU the `--devices`
  virtual devices share one machine, so a device's peak is the machine's divided by them.

`--devices N` makes N virtual CPU devices (XLA_FLAGS); it must come before JAX starts, so
this script sets it from sys.argv before importing JAX.
"""

import collections
import os
import re
import sys
import time


def _set_cpu_devices_from_argv():
  for arg in sys.argv[1:]:
    if arg.startswith('--devices='):
      count = int(arg.split('=', 1)[1])
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                                 f' --xla_force_host_platform_device_count={count}').strip()


_set_cpu_devices_from_argv()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mmjax import config_lib
from mmjax import sharding
from mmjax import tasks
from mmjax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config[:variant].')
_DEVICES = flags.DEFINE_integer('devices', None, 'Virtual CPU devices (CPU only).')
_DEPTHS = flags.DEFINE_string('depths', '', 'Comma-separated tower depths to compile-time.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed train steps (after one warm-up step).')
_PEAK = flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s per device; default: measured.')

_COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'collective-permute',
                'all-to-all')
_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'pred': 1, 's8': 1,
                'u8': 1, 'f64': 8, 's64': 8, 'u64': 8}


# --- HLO parsing -------------------------------------------------------------------------

def _shape_bytes(text: str) -> int:
  """Total bytes of every array shape (`f32[2,32,64]{...}`) in an HLO result type."""
  total = 0
  for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',') if d]))
  return total


def _group_size(line: str, num_devices: int) -> int:
  """Devices per replica group of a collective instruction."""
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return int(np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2))]))
  if m := re.search(r'replica_groups=\[([\d,]+)\]<=', line):
    return int(m.group(1).split(',')[-1])
  if m := re.search(r'replica_groups=\{\{([\d,]*)\}', line):
    return len(m.group(1).split(','))
  if 'source_target_pairs' in line:
    return 2
  return num_devices


def _computations(hlo: str) -> dict[str, list[str]]:
  """`{computation name: its instruction lines}`; the entry computation is 'ENTRY'."""
  computations, name = {}, None
  for line in hlo.split('\n'):
    if m := re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{$', line):
      name = 'ENTRY' if m.group(1) else m.group(2)
      computations[name] = []
    elif line.startswith('}'):
      name = None
    elif name is not None:
      computations[name].append(line)
  return computations


def _executions(computations: dict[str, list[str]]) -> dict[str, int]:
  """How many times each computation runs per call of the entry (while trip counts)."""
  counts = collections.Counter({'ENTRY': 1})
  order = ['ENTRY']
  for name in order:  # Breadth-first; HLO call graphs are acyclic.
    for line in computations.get(name, []):
      trips = 1
      if ' while(' in line:
        m = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
        trips = int(m.group(1)) if m else 1
      for callee in re.findall(r'(?:body|condition|calls|to_apply|branch_computations)='
                               r'\{?%([\w.\-]+)', line):
        counts[callee] += counts[name] * trips
        if callee not in order:
          order.append(callee)
  return counts


def collective_traffic(hlo: str, num_devices: int) -> dict[str, dict[str, float]]:
  """`{collective kind: {'count': executions per step, 'bytes': per device per step}}`."""
  computations = _computations(hlo)
  executions = _executions(computations)
  traffic = collections.defaultdict(lambda: {'count': 0, 'bytes': 0.0})
  for name, lines in computations.items():
    for line in lines:
      m = re.match(r'\s*(?:ROOT )?%[\w.\-]+ = (.*?) (' + '|'.join(_COLLECTIVES) +
                   r')(-start)?\(', line)
      if not m:
        continue
      kind, size = m.group(2), _shape_bytes(m.group(1))
      if m.group(3):  # async start: the result tuple holds (operand, result)
        size //= 2
      g = _group_size(line, num_devices)
      moved = {'all-gather': (g - 1) / g * size, 'all-to-all': (g - 1) / g * size,
               'reduce-scatter': (g - 1) * size, 'all-reduce': 2 * (g - 1) / g * size,
               'collective-permute': size}[kind]
      traffic[kind]['count'] += executions[name]
      traffic[kind]['bytes'] += executions[name] * moved
  return dict(traffic)


def theoretical_bytes(param_bytes: int, mesh_shape: dict[str, int]) -> float:
  """Minimum parameter/gradient traffic per device per step (see the module docstring)."""
  d, f = mesh_shape['data'], mesh_shape['fsdp']
  return 3 * (f - 1) / f * param_bytes + 2 * (d - 1) / d * param_bytes / f


# --- Measurements ------------------------------------------------------------------------

def _abstract_batch(trainer, batch_size):
  return {key: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=trainer.batch_sharding)
          for key, spec in trainer.task.batch_spec(batch_size).items()}


def compile_step(config, mesh):
  """(trainer, compiled train step, seconds to lower + compile)."""
  with sharding.activate(mesh):
    trainer = train.Trainer(config, mesh)
    start = time.perf_counter()
    compiled = trainer.train_step.lower(
        trainer.abstract_state, _abstract_batch(trainer, config.batch_size)).compile()
  return trainer, compiled, time.perf_counter() - start


def measure_peak_flops() -> float:
  """FLOP/s of a float32 4096^3 matmul on device 0 (best of 3)."""
  n = 4096
  x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = min(_timed(lambda: matmul(x).block_until_ready()) for _ in range(3))
  return 2 * n ** 3 / best


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def time_steps(trainer, config, mesh, steps: int) -> float:
  """Seconds per train step on random data (after one warm-up step)."""
  rng = np.random.default_rng(0)
  with sharding.activate(mesh):
    state = trainer.init_state(jax.random.PRNGKey(0))
    batch = {}
    for key, spec in trainer.task.batch_spec(config.batch_size).items():
      if jnp.issubdtype(spec.dtype, jnp.integer):
        values = rng.integers(1, config.model.text.vocab_size, spec.shape).astype(spec.dtype)
      else:
        values = rng.uniform(-1, 1, spec.shape).astype(spec.dtype)
      batch[key] = sharding.global_batch(values, trainer.batch_sharding)
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps


def _mib(num_bytes: float) -> str:
  return f'{num_bytes / 2 ** 20:,.2f} MiB'


def main(argv):
  del argv
  config = _CONFIG.value
  devices = jax.devices()
  tasks.validate_config(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  mesh_shape = dict(mesh.shape)
  print(f'# {sys.argv[0]} {" ".join(sys.argv[1:])}')
  print(f'devices: {len(devices)} x {devices[0].device_kind}, mesh {mesh_shape}, '
        f'global batch {config.batch_size}\n')

  if _DEPTHS.value:
    print('| depth (image, text) | compile seconds | ratio to first |')
    print('| --- | --- | --- |')
    first = None
    for depth in [int(d) for d in _DEPTHS.value.split(',')]:
      with config.unlocked():
        config.model.image.depth = config.model.text.depth = depth
      seconds = compile_step(config, mesh)[2]
      first = first or seconds
      print(f'| {depth} | {seconds:.2f} | {seconds / first:.2f} |', flush=True)
    print(f'\n(what follows is for depth {depth})\n')

  trainer, compiled, seconds = compile_step(config, mesh)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0))
  params = trainer.abstract_state['params']
  param_bytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in jax.tree.leaves(params))
  print(f'compile: {seconds:.2f} s; parameters {_mib(param_bytes)} '
        f'({sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)):,})')
  print(f'memory per device: arguments {_mib(memory.argument_size_in_bytes)}, outputs '
        f'{_mib(memory.output_size_in_bytes)} (aliased {_mib(memory.alias_size_in_bytes)}), '
        f'temporaries {_mib(memory.temp_size_in_bytes)}')
  print(f'FLOPs per device per step: {flops:.4g}\n')

  traffic = collective_traffic(compiled.as_text(), len(devices))
  total = sum(t['bytes'] for t in traffic.values())
  minimum = theoretical_bytes(param_bytes, mesh_shape)
  print('| collective | executions / step | bytes / device / step |')
  print('| --- | --- | --- |')
  for kind, t in sorted(traffic.items()):
    print(f'| {kind} | {t["count"]} | {_mib(t["bytes"])} |')
  ratio = f'{total / minimum:.2f}x' if minimum else 'n/a (one device on data/fsdp)'
  print(f'| **total** | | **{_mib(total)}** (theoretical minimum for params/grads '
        f'{_mib(minimum)}: {ratio}) |\n')

  step_seconds = time_steps(trainer, config, mesh, _STEPS.value)
  if _PEAK.value:
    peak, source = _PEAK.value * 1e12, 'given'
  else:
    peak, source = measure_peak_flops(), 'measured 4096^3 matmul on device 0'
    if devices[0].platform == 'cpu':
      peak /= len(jax.local_devices())  # Virtual CPU devices share the machine.
  print(f'step: {step_seconds * 1e3:.1f} ms, {config.batch_size / step_seconds:,.0f} '
        f'examples/s, {flops / step_seconds / 1e9:.2f} GFLOP/s per device')
  print(f'peak per device {peak / 1e9:.1f} GFLOP/s ({source}); '
        f'MFU {flops / step_seconds / peak:.1%}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
