r"""Our jitted CLIP train step vs Hugging Face `transformers` CLIPModel on the same CPU.

  .venv/bin/python experiments/bench_clip_step.py --config configs/clip.py:tiny
  .venv/bin/python experiments/bench_clip_step.py --config configs/clip.py:small

Both sides run the same architecture from the same initial weights (ours imports the
`transformers` model's), on the same batch, with the same clipping, AdamW and schedule: their
step-0 and step-4 losses agree to 1e-6. `transformers` runs in a child process with glibc's
default malloc (`mmjax.xla_flags.tune_malloc` is process-wide and would change torch's too);
the two alternate block by block, a round is dropped when another process used the CPU, and
the median block counts. `--variant` adds our step under config overrides; `--breakdown`
times forward, forward + backward and the optimizer update separately.

Measured on the 2-core machine (quiet, 8 rounds; docs/performance.md has the table):
  tiny   mmjax 1643 ex/s vs transformers 1690: 0.97 (scan_unroll=False: 0.78)
  small  mmjax  753 ex/s vs transformers  640: 1.18 (scan_unroll=False: 0.96)
  tiny, again (12 rounds, a slower day): 1171 vs 1078 ex/s, 1.09; per-round paired ratios
         0.98 [0.89, 1.26]: parity within the noise
Where the time goes (jax.profiler trace of the small step, by HLO op): 73% in XNNPACK
matmul fusions (forward faster than torch's: 44 vs 48 ms; forward + backward 166 vs 146 ms),
7% transposed copies feeding the weight-gradient matmuls, 5% the AdamW update (ours 3x
faster than torch's: 11 vs 35 ms), the rest bias-gradient and layer-norm reductions. What
moved the ratio, tiny / small: glibc malloc re-faulting XLA's per-step temporary buffer
(`mmjax.xla_flags.tune_malloc`: ~28% more examples/s); the scan over layers copying stacked
activations in and out of while loops (`config.model.scan_unroll=True`: +22-25%); erf instead
of erfc GELU (`layers.gelu`). Tried without effect: XLA:CPU flags (incl.
xnn_graph_fusion_mode=GREEDY, opt_preset=FAST_RUNTIME, ynn_fusion_type=+reduce), one fused
query/key/value matmul (+1%). Still slower than torch on tiny: the backward pass (28 vs
23 ms), ~600 small ops whose fixed costs dominate at width 64.
"""

import ast
import math
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/clip.py:tiny',
                                          'Experiment config file[:variant].')
_STEPS = flags.DEFINE_integer('steps', 0, 'Steps per timed block (0: ~2 s of work).')
_BLOCKS = flags.DEFINE_integer('blocks', 6, 'Quiet timed blocks per framework, alternating.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps per framework after compiling.')
_BREAKDOWN = flags.DEFINE_bool('breakdown', False,
                               'Also time forward, forward+backward and update separately.')
_XLA_FLAGS = flags.DEFINE_bool('xla_flags', True,
                               'Apply mmjax.xla_flags (False: XLA defaults, for comparison).')
_MAX_LOAD = flags.DEFINE_float(
    'max_load', 0.1, 'A block pair counts only if other processes used fewer cores than this.')
_MAX_MINUTES = flags.DEFINE_float('max_minutes', 30, 'Give up waiting for quiet blocks after.')
_SETTLE = flags.DEFINE_float('settle', 1.0, 'Seconds of sleep before each timed block.')
_VARIANTS = flags.DEFINE_multi_string(
    'variant', ['model.scan_unroll=False'],
    'Also time our step with these config overrides (KEY=VALUE[,KEY=VALUE]), for comparison; '
    'a variant equal to the config itself is skipped.')
_SAME_WEIGHTS = flags.DEFINE_bool('same_weights', True,
                                  'Import the transformers initial weights into ours.')


# ---------------------------------------------------------------------------------------
# Config mapping: ours -> transformers (the inverse of mmjax.convert.hf_clip.config_from_hf).

# Our `layers.ACTIVATIONS` key -> HF `hidden_act` (inverse of hf_common.ACTIVATIONS).
HF_ACTIVATIONS = {'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh', 'quick_gelu': 'quick_gelu'}


def token_ids_of(tokenizer_name):
  """`(pad, bos, eot)` ids of one of our tokenizers (`mmjax.data.tokenizers.TOKENIZERS`)."""
  from mmjax.data import tokenizers
  tokenizer = tokenizers.TOKENIZERS[tokenizer_name]
  return tokenizer.pad_id, tokenizer.bos_id, tokenizer.eot_id


def hf_config_from_ours(config):
  """`config` (configs/clip.py) -> `transformers.CLIPConfig` of the same architecture."""
  import transformers
  model = config.model
  pad, bos, eot = token_ids_of(config.data.tokenizer)

  def tower(t):
    mlp = int(t.width * t.mlp_ratio)
    return dict(hidden_size=t.width, intermediate_size=mlp, num_hidden_layers=t.depth,
                num_attention_heads=t.num_heads, hidden_act=HF_ACTIVATIONS[t.activation],
                layer_norm_eps=t.layer_norm_eps, attention_dropout=0.0)

  return transformers.CLIPConfig(
      vision_config=dict(image_size=config.data.image_size, patch_size=model.image.patch_size,
                         num_channels=3, **tower(model.image)),
      text_config=dict(vocab_size=model.text.vocab_size,
                       max_position_embeddings=model.text.context_length,
                       pad_token_id=pad, bos_token_id=bos, eos_token_id=eot, **tower(model.text)),
      projection_dim=model.embed_dim, logit_scale_init_value=model.temperature_init)


def check_same_architecture(config, hf_config):
  """Our config.model and `config_from_hf(hf_config)` must describe one model."""
  from mmjax.convert import hf_clip
  back = hf_clip.config_from_hf(hf_config, scan=config.model.scan)
  for tower in ('image', 'text'):
    ours = dict(config.model[tower], scan=config.model.scan)
    for key, value in back[tower].items():
      if key in ours and ours[key] != value:
        raise ValueError(f'{tower}.{key}: ours {ours[key]!r}, from HF {value!r}')
  assert back['embed_dim'] == config.model.embed_dim
  assert back['temperature_init'] == config.model.temperature_init
  return back


def random_batch(config, seed=0):
  """Images in [-1, 1] `[b, s, s, 3]` and token rows `[BOS, ids..., EOT, pad...]`."""
  import numpy as np
  rng = np.random.default_rng(seed)
  b, s, length = config.batch_size, config.data.image_size, config.data.max_text_len
  pad, bos, eot = token_ids_of(config.data.tokenizer)
  images = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
  text = np.full((b, length), pad, np.int32)
  for row in range(b):
    n = int(rng.integers(1, length - 1))  # tokens between BOS and EOT
    text[row, 0] = bos
    text[row, 1:1 + n] = rng.integers(1, bos, n)
    text[row, 1 + n] = eot
  return images, text


def lr_at(config, step):
  """`mmjax.train.learning_rate_schedule` in plain Python (for the torch scheduler)."""
  warmup = min(config.schedule.warmup_steps, config.total_steps)
  if step < warmup:
    return config.lr * step / warmup
  decay = max(config.total_steps, warmup + 1) - warmup
  t = min(step - warmup, decay) / decay
  alpha = config.schedule.end_lr_fraction
  return config.lr * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * t)) + alpha)


# ---------------------------------------------------------------------------------------
# The two implementations.

class Ours:
  """`mmjax.train.Trainer.train_step` on one CPU device, data kept out of the loop."""

  def __init__(self, config, images, text, hf_state_dict=None, name='mmjax'):
    import jax
    import numpy as np
    from mmjax import sharding
    from mmjax import train
    from mmjax.tasks import clip as clip_task

    class BenchTask(clip_task.ClipTask):
      def __init__(self, config):  # no data pipeline, no tokenizer
        self.config = config
        self.model = clip_task.build_model(config)

    self.jax = jax
    self.name = name
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.mesh = dict(data=1, fsdp=1, tensor=1)
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    with sharding.activate(self.mesh):
      self.trainer = trainer = train.Trainer(config, self.mesh, BenchTask(config))
      state = trainer.init_state(jax.random.PRNGKey(config.seed))
      if hf_state_dict is not None:
        from mmjax.convert import hf_clip
        hf_layout = check_same_architecture(config, self.hf_config)
        params = hf_clip.params_from_hf(hf_state_dict, hf_layout)
        params = jax.tree.map(lambda p, like: np.asarray(p, like.dtype).reshape(like.shape),
                              params, jax.device_get(state['params']))
        state = dict(state, params=params, opt_state=trainer.optimizer.init(params))
        state = jax.device_put(state, trainer.state_shardings)
      self.state = state
      self.batch = jax.device_put({'image': images, 'text': text}, trainer.batch_sharding)
      self.step = trainer.train_step
      self._loss = jax.jit(trainer.task.loss)
      self._grad = jax.jit(jax.value_and_grad(trainer.task.loss, has_aux=True))
      self._update = jax.jit(self._update_fn, donate_argnums=0)

  def _update_fn(self, state, grads):
    import optax
    updates, opt_state = self.trainer.optimizer.update(grads, state['opt_state'], state['params'])
    return dict(state, params=optax.apply_updates(state['params'], updates), opt_state=opt_state)

  def compile(self):
    """Compiles (by running) and returns the step-0 loss."""
    self.state, metrics = self.step(self.state, self.batch)
    return float(metrics['loss'])

  def run(self, n):
    state, metrics = self.state, None
    for _ in range(n):
      state, metrics = self.step(state, self.batch)
    self.jax.block_until_ready((state, metrics))
    self.state = state
    return float(metrics['loss'])

  # Phases, for --breakdown (each blocks on its result).
  def forward(self):
    self.jax.block_until_ready(self._loss(self.state['params'], self.batch, None))

  def forward_backward(self):
    out = self._grad(self.state['params'], self.batch, None)
    self.jax.block_until_ready(out)
    return out[1]

  def update(self, grads):
    self.state = self._update(self.state, grads)
    self.jax.block_until_ready(self.state)

  def timed_run(self, n):
    return timed(self.run, n)[:2]

  def time_phase(self, phase):
    return time_phase(self, phase)


class Transformers:
  """`transformers.CLIPModel(return_loss=True)`, backward, grad clipping, AdamW."""
  name = 'transformers'

  def __init__(self, config, hf_config, images, text):
    import torch
    import transformers
    self.torch = torch
    torch.manual_seed(config.seed)
    self.model = transformers.CLIPModel(hf_config).train()
    params = list(self.model.parameters())
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    self.optimizer = torch.optim.AdamW(
        [dict(params=decay, weight_decay=config.wd), dict(params=no_decay, weight_decay=0.0)],
        lr=config.lr, betas=(config.adam.b1, config.adam.b2), eps=config.adam.eps)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
        self.optimizer, lambda step: lr_at(config, step) / config.lr)
    self.clip = config.grad_clip_norm
    self.pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # NCHW
    self.ids = torch.from_numpy(text).long()
    self.initial_state = {k: v.clone() for k, v in self.model.state_dict().items()}

  def _loss(self):
    return self.model(input_ids=self.ids, pixel_values=self.pixels, return_loss=True).loss

  def train_step(self):
    loss = self._loss()
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.optimizer.step()
    self.scheduler.step()
    self.optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  def compile(self):
    return float(self.train_step())

  def run(self, n):
    for _ in range(n):
      loss = self.train_step()
    return float(loss)

  def forward(self):
    self._loss()  # builds the autograd graph, as in training

  def forward_backward(self):
    self.optimizer.zero_grad(set_to_none=True)
    self._loss().backward()

  def update(self, grads):
    del grads  # left in .grad by forward_backward
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.optimizer.step()


def _transformers_worker(connection, config, hf_config_dict, images, text):
  """Serves a `Transformers` in a process of its own: commands `(method, *args)`."""
  import torch
  import transformers
  impl = Transformers(config, transformers.CLIPConfig(**hf_config_dict), images, text)
  connection.send({k: v.numpy() for k, v in impl.initial_state.items()})
  connection.send(f'torch {torch.__version__} threads {torch.get_num_threads()} (interop '
                  f'{torch.get_num_interop_threads()}), attention '
                  f'{impl.model.config._attn_implementation or "default (sdpa)"}, '
                  'glibc malloc defaults')
  while True:
    method, *args = connection.recv()
    if method == 'close':
      return
    if method == 'timed_run':
      connection.send(timed(impl.run, *args)[:2])
    elif method == 'time_phase':
      connection.send(time_phase(impl, *args))
    else:
      connection.send(getattr(impl, method)(*args))


class TransformersProcess:
  """`Transformers` run in a child process with glibc's default malloc settings.

  `mmjax.xla_flags.tune_malloc` is process-wide; in one process it would change torch's
  allocator too. The child times its own blocks (its CPU counts as its own, not as another
  process's), and only one side runs at a time.
  """
  name = 'transformers'

  def __init__(self, config, hf_config, images, text):
    import multiprocessing
    context = multiprocessing.get_context('spawn')
    self._connection, child = context.Pipe()
    self._process = context.Process(
        target=_transformers_worker, daemon=True,
        args=(child, config, hf_config.to_dict(), images, text))
    self._process.start()
    self.initial_state = self._connection.recv()
    self.description = self._connection.recv()

  def _call(self, method, *args):
    self._connection.send((method, *args))
    return self._connection.recv()

  def compile(self):
    return self._call('compile')

  def run(self, n):
    return self._call('run', n)

  def timed_run(self, n):
    return self._call('timed_run', n)

  def time_phase(self, phase):
    return self._call('time_phase', phase)

  def close(self):
    self._connection.send(('close',))
    self._process.join()


# ---------------------------------------------------------------------------------------
# Timing that notices other processes: the machine is shared, and on 2 cores any other busy
# process halves what a block gets (torch's OpenMP threads then spin and slow 10-100x).

_CLK = os.sysconf('SC_CLK_TCK')


def _cpu_seconds():
  """(CPU seconds all processes spent busy, CPU seconds of this process) since boot."""
  with open('/proc/stat') as f:
    fields = [int(v) for v in f.readline().split()[1:]]
  busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
  with open('/proc/self/stat') as f:
    own = f.read().rsplit(')', 1)[1].split()
  return busy / _CLK, (int(own[11]) + int(own[12])) / _CLK  # utime + stime


def timed(fn, *args):
  """`(seconds, others, result)`: wall time of `fn(*args)` and the CPU that other processes
  used meanwhile, in cores (0.0 = the machine was ours)."""
  busy0, own0 = _cpu_seconds()
  start = time.perf_counter()
  out = fn(*args)
  seconds = time.perf_counter() - start
  busy1, own1 = _cpu_seconds()
  others = max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds
  return seconds, others, out


def time_phase(impl, phase):
  """`(seconds, others)` of one `phase` of `impl`: 'forward', 'forward_backward', 'update'
  (clipping + AdamW on fresh gradients) or 'train_step' (one whole step)."""
  if phase == 'update':
    grads = impl.forward_backward()
    return timed(impl.update, grads)[:2]
  if phase == 'train_step':
    return timed(impl.run, 1)[:2]
  getattr(impl, phase)()  # the same again first: caches, allocator
  return timed(getattr(impl, phase))[:2]


def wait_for_quiet(max_load, timeout=1800.0):
  """Sleeps until other processes use < max_load cores over 5 s (or until timeout)."""
  deadline = time.time() + timeout
  while True:
    others = timed(time.sleep, 5.0)[1]
    if others < max_load or time.time() > deadline:
      return others


def _literal(text: str):
  """'False' -> False, '2' -> 2, 'abc' -> 'abc' (a command-line override's value)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  settings = {}
  if _XLA_FLAGS.value:
    from mmjax import xla_flags
    settings = xla_flags.apply()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax  # noqa: F401  (after the flags)
  from mmjax import config_lib

  config = _CONFIG.value
  variant = config.get('variant', '?')
  hf_config = hf_config_from_ours(config)
  check_same_architecture(config, hf_config)
  images, text = random_batch(config)

  theirs = TransformersProcess(config, hf_config, images, text)
  Ours.hf_config = hf_config
  weights = theirs.initial_state if _SAME_WEIGHTS.value else None
  impls = [Ours(config, images, text, hf_state_dict=weights, name='mmjax (config)')]
  for variant_spec in _VARIANTS.value:
    overrides = dict(item.split('=', 1) for item in variant_spec.split(','))
    overrides = {key: _literal(value) for key, value in overrides.items()}
    variant_config = config.copy_and_resolve_references()
    if all(config_lib.get_key(config, key) == value for key, value in overrides.items()):
      continue
    for key, value in overrides.items():
      config_lib.set_key(variant_config, key, value)
    impls.append(Ours(variant_config, images, text, hf_state_dict=weights,
                      name=f'mmjax ({variant_spec})'))
  impls.append(theirs)
  from mmjax import sharding
  try:
    with sharding.activate(impls[0].mesh):  # traces (first calls) need the logical axis rules
      _bench(config, variant, impls, settings)
  finally:
    theirs.close()


def _bench(config, variant, impls, settings):
  import jax
  import numpy as np

  names = [impl.name for impl in impls]
  print(f'config {variant}: batch {config.batch_size}, image {config.data.image_size}px '
        f'patch {config.model.image.patch_size}, text length {config.data.max_text_len}, '
        f'vocab {config.model.text.vocab_size}, widths {config.model.image.width}/'
        f'{config.model.text.width}, depths {config.model.image.depth}/'
        f'{config.model.text.depth}, heads {config.model.image.num_heads}/'
        f'{config.model.text.num_heads}, {config.model.image.activation}, '
        f'scan={config.model.scan}, scan_unroll={config.model.scan_unroll}', flush=True)
  print(f'mmjax: jax {jax.__version__}, {jax.devices()}, XLA_FLAGS='
        f'{os.environ.get("XLA_FLAGS", "")!r}, mmjax.xla_flags.apply() -> '
        f'{settings or "not called"}; XLA:CPU sizes its own thread pool to the '
        f'{os.cpu_count()} cores', flush=True)
  print(f'transformers (own process): {impls[-1].description}', flush=True)

  start = time.perf_counter()
  losses = {impl.name: impl.compile() for impl in impls}
  print('step-0 loss: ' + '  '.join(f'{n} {v:.6f}' for n, v in losses.items()) +
        f'  (first steps incl. compile {time.perf_counter() - start:.1f} s)', flush=True)
  losses = {impl.name: impl.run(_WARMUP.value) for impl in impls}
  print(f'loss after {1 + _WARMUP.value} steps: ' +
        '  '.join(f'{n} {v:.6f}' for n, v in losses.items()), flush=True)

  max_load = _MAX_LOAD.value
  deadline = time.time() + 60 * _MAX_MINUTES.value
  steps = _STEPS.value
  if not steps:  # ~2 s of the slowest one per block
    wait_for_quiet(max_load, timeout=max(0.0, deadline - time.time()))
    per_step = max(impl.timed_run(3)[0] / 3 for impl in impls)
    steps = max(2, int(2.0 / per_step))
  for impl in impls:  # one untimed block each: the first blocks after compiling run slow
    time.sleep(_SETTLE.value)
    impl.run(steps)
  times = {name: [] for name in names}
  dropped = 0
  rounds = 0
  while min(len(t) for t in times.values()) < _BLOCKS.value and time.time() < deadline:
    order = impls if rounds % 2 == 0 else impls[::-1]
    rounds += 1
    results = {}
    for impl in order:
      time.sleep(_SETTLE.value)  # let the previous one's worker threads stop spinning
      results[impl.name] = impl.timed_run(steps)
    line = '  '.join(f'{name} {config.batch_size * steps / sec:7.1f} ex/s (others {o:.2f})'
                     for name, (sec, o) in results.items())
    if max(o for _, o in results.values()) < max_load:
      for name, (sec, _) in results.items():
        times[name].append(sec)
      print(f'round {rounds}: {line}', flush=True)
    else:  # the whole round goes, so that every implementation keeps seeing the same conditions
      dropped += 1
      print(f'round {rounds}: {line}  -- dropped, another process was busy', flush=True)
      wait_for_quiet(max_load, timeout=max(0.0, deadline - time.time()))
  if not times[names[0]]:
    raise SystemExit(f'no quiet round in {_MAX_MINUTES.value} minutes; nothing to report')
  rate = {name: config.batch_size * steps / float(np.median(t)) for name, t in times.items()}

  if _BREAKDOWN.value:
    print('\nphase breakdown: median ms per step over 7 quiet samples (update = clipping + AdamW)')
    print('| phase | ' + ' | '.join(f'{n} ms' for n in names) + ' |')
    print('| --- |' + ' --- |' * len(names))
    for phase in ('forward', 'forward_backward', 'update', 'train_step'):
      row = {}
      for impl in impls:
        samples = []
        tries = 0
        while len(samples) < 7 and tries < 50:
          tries += 1
          seconds, others = impl.time_phase(phase)
          if others < max_load:
            samples.append(seconds)
          else:
            wait_for_quiet(max_load, timeout=60)
        row[impl.name] = 1e3 * float(np.median(samples)) if samples else float('nan')
      print(f'| {phase} | ' + ' | '.join(f'{row[n]:.2f}' for n in names) + ' |')

  print(f'\n{steps} steps per block; {len(times[names[0]])} quiet rounds, each implementation '
        f'once per round in alternating order ({dropped} rounds dropped: other processes above '
        f'{max_load} cores); median block')
  # Each round's own ratio too: the machine's speed drifts between rounds, and a round's two
  # blocks run back to back, so the paired ratios spread less than the rates do.
  print('| config | implementation | mmjax ex/s | transformers ex/s | ratio | per-round ratio: '
        'median [min, max] |')
  print('| --- | --- | --- | --- | --- | --- |')
  for name in names[:-1]:
    paired = np.array(times['transformers']) / np.array(times[name])
    print(f'| {variant} | {name} | {rate[name]:.0f} | {rate["transformers"]:.0f} | '
          f'{rate[name] / rate["transformers"]:.2f} | {np.median(paired):.2f} '
          f'[{paired.min():.2f}, {paired.max():.2f}] |')
  print('\ncommand: ' + ' '.join([os.path.relpath(sys.executable)] + sys.argv), flush=True)


if __name__ == '__main__':
  app.run(main)
