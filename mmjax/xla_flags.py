"""Process settings for XLA:CPU train steps; call `apply()` before JAX starts.

* `tune_malloc()`: glibc keeps XLA:CPU's per-step temporary buffer in the process (one
  arena, no `mmap` for large blocks, no trimming) instead of mapping and unmapping it every
  step; numerics are unaffected, and freed memory is kept for reuse rather than returned to
  the OS (the process stays at its peak).
* `XLA_FLAGS`: `FLAGS` are appended (none by default).

Why and how much: docs/performance.md (measured with `experiments/bench_clip_step.py`).
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
