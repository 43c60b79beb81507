r"""Per-device memory and FLOPs of loss + gradient: gathered (GSPMD) vs ring contrastive losses.

Compiles (does not run) `jax.value_and_grad` of `mmjax.losses` and `mmjax.ring_losses`
for a global batch sharded over fake CPU devices and prints, per device, the temporary
and argument bytes from `compiled.memory_analysis()`, the FLOPs from `cost_analysis()`
and the matmul FLOPs counted by hand, as a markdown table.

  python experiments/bench_losses.py --batch 16384 --dim 512 --devices 8

XLA's cost analysis counts the body of a while loop once, not once per trip, so its
FLOPs for the ring (a `scan` over n - 2 steps plus two unrolled steps) are a lower
bound; the hand count is exact for the matmuls: per device, with b = B / n, the
gathered loss does 3 matmuls of b x B x d (logits, then the two gradients) and the ring
does 4 (its backward pass recomputes each logit block).
"""

import argparse
import os
import shlex
import sys


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=16384, help='global batch size B')
  parser.add_argument('--dim', type=int, default=512, help='embedding dimension d')
  parser.add_argument('--devices', type=int, default=8, help='fake CPU devices (data axis)')
  parser.add_argument('--mesh', default='', help="mesh sizes, e.g. 'data=2,fsdp=4' "
                      '(default: data=DEVICES)')
  parser.add_argument('--losses', default='sigmoid,softmax')
  return parser.parse_args()


ARGS = parse_args()
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={ARGS.devices}').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mmjax import losses  # noqa: E402
from mmjax import ring_losses  # noqa: E402
from mmjax import sharding  # noqa: E402

MIB = 2.0 ** 20


def compile_loss(fn, num_args, mesh, batch, dim):
  embeddings = jax.ShapeDtypeStruct((batch, dim), jnp.float32,
                                    sharding=sharding.batch_sharding(mesh))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  args = (embeddings, embeddings, scalar, scalar)[:num_args]
  # Gradients come out sharded as their inputs (left free, GSPMD replicates the gathered
  # loss's text gradient: an all-reduce instead of a reduce-scatter, and 32 MiB more).
  out_shardings = (scalar.sharding, tuple(arg.sharding for arg in args))
  grad_fn = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(num_args))),
                    out_shardings=out_shardings)
  with sharding.activate(mesh):
    return grad_fn.lower(*args).compile()


def main():
  mesh_axes = dict(data=ARGS.devices)
  if ARGS.mesh:
    mesh_axes = {k: int(v) for k, v in (item.split('=') for item in ARGS.mesh.split(','))}
  mesh = sharding.make_mesh(mesh_axes)
  n = sharding.data_parallel_size(mesh)
  batch, dim = ARGS.batch, ARGS.dim
  block = batch // n
  print(f'global batch {batch}, dim {dim}, mesh {dict(mesh.shape)} -> {n} batch shards of '
        f'{block}; float32; per device')
  print(f'gathered logits per device [{block}, {batch}] = {block * batch * 4 / MIB:.1f} MiB, '
        f'one ring block [{block}, {block}] = {block * block * 4 / MIB:.1f} MiB\n')

  rows = []
  for name in ARGS.losses.split(','):
    num_args = 4 if name == 'sigmoid' else 3
    temps = {}
    for impl, module, matmuls in (('gathered', losses, 3), ('ring', ring_losses, 4)):
      fn = getattr(module, f'{name}_contrastive_loss')
      compiled = compile_loss(fn, num_args, mesh, batch, dim)
      memory = compiled.memory_analysis()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      hlo = compiled.as_text()
      global_logits = f'{block},{batch}]' in hlo or f'{batch},{batch}]' in hlo
      temps[impl] = memory.temp_size_in_bytes
      rows.append((name, impl, memory.temp_size_in_bytes / MIB,
                   memory.argument_size_in_bytes / MIB, memory.output_size_in_bytes / MIB,
                   cost.get('flops', float('nan')) / 1e9,
                   2 * matmuls * block * batch * dim / 1e9, global_logits))
    rows.append((name, 'ring / gathered', temps['ring'] / temps['gathered']))

  print('| loss | impl | temp MiB | arguments MiB | outputs MiB | XLA GFLOP | matmul GFLOP '
        '| [B/n, B] in HLO |')
  print('|---|---|---:|---:|---:|---:|---:|---|')
  for row in rows:
    if len(row) == 3:
      print(f'| {row[0]} | **{row[1]}** | **{row[2]:.3f}** | | | | | |')
    else:
      name, impl, temp, argument, output, flops, matmul_flops, global_logits = row
      print(f'| {name} | {impl} | {temp:.1f} | {argument:.2f} | {output:.2f} | {flops:.1f} '
            f'| {matmul_flops:.1f} | {"yes" if global_logits else "no"} |')
  print('\ncommand: ' + ' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] +
                                  sys.argv[1:]))


if __name__ == '__main__':
  main()
