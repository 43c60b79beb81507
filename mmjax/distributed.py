"""Starting JAX on several processes (hosts), before anything touches a device.

Three cases, tried in order by `initialize`:

1. Explicit: a coordinator address (`--coordinator host:port`, or `JAX_COORDINATOR_ADDRESS`)
   with the number of processes and this process's id (`--num_processes`, `--process_id`,
   or `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`). Works anywhere, e.g. two processes on
   localhost with 4 CPU devices each.
2. Detected: inside a SLURM job step with several tasks (`srun`), with several TPU workers
   named in `TPU_WORKER_HOSTNAMES`, or when asked with `--coordinator=auto` (e.g. on a Cloud
   TPU pod slice), `jax.distributed.initialize()` finds the coordinator, process count and
   id by itself.
3. Otherwise one process: nothing to do.

After it, `jax.devices()` lists every process's devices; the mesh spans all of them, each
process feeds its block of every global batch and writes its own checkpoint shards, and
only process 0 writes logs and metrics.
"""

import os

import jax


def _several_slurm_tasks() -> bool:
  return int(os.environ.get('SLURM_NTASKS', os.environ.get('SLURM_NPROCS', '1'))) > 1


def _several_tpu_workers() -> bool:
  return len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:
  """Initialises `jax.distributed` if this is one of several processes.

  Returns how: 'explicit', 'detected' or 'single'. Must run before the first JAX
  computation (call it at the top of `main`).
  """
  coordinator = coordinator or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if coordinator == 'auto':  # Let JAX detect the cluster (TPU, SLURM, Open MPI, k8s).
    jax.distributed.initialize()
    return 'detected'
  if coordinator:
    num_processes = num_processes or _env_int('JAX_NUM_PROCESSES')
    process_id = process_id if process_id is not None else _env_int('JAX_PROCESS_ID')
    if num_processes is None or process_id is None:
      raise ValueError(f'coordinator {coordinator!r} given without the number of processes '
                       f'and this process id (--num_processes, --process_id)')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'process_id={process_id} is not in [0, num_processes={num_processes})')
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return 'explicit'
  if _several_slurm_tasks() or _several_tpu_workers():
    jax.distributed.initialize()
    return 'detected'
  return 'single'


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


def is_chief() -> bool:
  """Whether this process writes logs, metrics and plots (process 0)."""
  return jax.process_index() == 0


def define_flags():
  """Defines `--coordinator`, `--num_processes`, `--process_id` for an entry point's main;
  pass the returned holders' values to `initialize`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return (
      flags.DEFINE_string('coordinator', None, 'host:port of process 0 for a multi-process '
                          "run, or 'auto' to let JAX detect the cluster (default: "
                          '$JAX_COORDINATOR_ADDRESS, else SLURM / TPU detection)'),
      flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator).'),
      flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.'),
  )
