"""Process settings that make XLA:CPU train steps faster; call `apply()` before JAX starts.

Measured with `experiments/bench_clip_step.py` (its docstring has the numbers):

* `tune_malloc()`: XLA:CPU takes every execution's temporary buffer (66 MB for
  `configs/clip.py:tiny`) from `malloc` on a runtime thread. glibc serves a request that
  large from a thread's arena (heaps of at most 64 MB) with a fresh `mmap` and returns it with
  `munmap` at the end of the step, so each step page-faults its whole working set again:
  ~21,000 faults and ~40 ms of kernel time per tiny step on the 2-core machine, about a third
  of the step's CPU time. One arena, no `mmap` for large blocks and no trimming keep those
  pages in the process, and the faults go away. Numerics are unaffected. The cost: freed
  memory is kept for reuse rather than returned to the OS (the process stays at its peak).
* `XLA_FLAGS`: none is added by default (`FLAGS` is empty); every flag tried changed the
  step time by less than the noise or made it slower (see the benchmark's docstring).
  `--xla_cpu_use_thunk_runtime=false`, ~18% faster in an older jaxlib, is ignored by
  jaxlib 0.10 (the thunk runtime is the only one left).

Where to call it: first thing in an entry point's `main` (`mmjax.train`, `mmjax.evaluate`,
benchmarks), before anything imports `jax` or creates threads. Environment variables the
user has set (`XLA_FLAGS` entries, `MALLOC_*`) win over these defaults.
"""

import ctypes
import ctypes.util
import os
import sys

# Extra XLA flags for the CPU backend, appended to XLA_FLAGS unless the user set the same one.
FLAGS: tuple[str, ...] = ()

# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_MALLOC_ENV = ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_',
               'MALLOC_MMAP_THRESHOLD_', 'GLIBC_TUNABLES')


def add_xla_flags(flags=FLAGS) -> str:
  """Appends `flags` to `$XLA_FLAGS`, skipping any whose name is already there; returns it."""
  current = os.environ.get('XLA_FLAGS', '')
  names = {flag.split('=', 1)[0] for flag in current.split()}
  extra = [flag for flag in flags if flag.split('=', 1)[0] not in names]
  os.environ['XLA_FLAGS'] = ' '.join([current, *extra]).strip()
  return os.environ['XLA_FLAGS']


def tune_malloc() -> bool:
  """glibc: one malloc arena, no mmap-backed blocks, no trimming (see the module docstring).

  Returns whether it changed anything: False off Linux/glibc, or when the user configured
  malloc through the environment. Affects only threads that have not allocated yet, so call
  it before JAX (or torch) starts its thread pools.
  """
  if not sys.platform.startswith('linux') or any(name in os.environ for name in _MALLOC_ENV):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and others have no mallopt
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  ok = mallopt(_M_ARENA_MAX, 1) == 1
  ok &= mallopt(_M_MMAP_MAX, 0) == 1
  ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
  return bool(ok)


def apply() -> dict:
  """`add_xla_flags()` and `tune_malloc()`; call before the first `import jax`."""
  if 'jax' in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      raise RuntimeError('mmjax.xla_flags.apply() must run before JAX initialises a backend')
  return {'XLA_FLAGS': add_xla_flags(), 'malloc_tuned': tune_malloc()}
