r"""Greedy decoding speed: `mmjax.generate` with and without the KV cache vs HF `generate`.

Random-init `LlamaForCausalLM`s (every weight perturbed by 2 / sqrt(fan-in) so the logits
are far from uniform) imported with `mmjax.convert.hf_llama`; prompts of `--prompt` random
tokens, `--new` new tokens, no stop token. The three are timed alternately in one run,
`--repeats` times each after one warm-up call (compilation excluded), and the table shows
medians: new tokens per second (batch * new / seconds) and the ratios. The last column says
whether our greedy tokens (with and without the cache) equal HF's.

  python experiments/bench_generate.py --new 128 --batches 1,8 --repeats 5
"""

import argparse
import os
import shlex
import statistics
import sys
import time

os.environ['HF_HUB_OFFLINE'] = '1'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from mmjax import generate as gen  # noqa: E402
from mmjax.convert import hf_llama  # noqa: E402
from mmjax.models.decoder import DecoderLM  # noqa: E402

# name -> LlamaConfig kwargs
MODELS = {
    'tiny (w64 d2 v96)': dict(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=128),
    'small (w256 d4 v1000)': dict(vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4,
                                  intermediate_size=688),
}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--prompt', type=int, default=16, help='prompt tokens per row')
  parser.add_argument('--new', type=int, default=128, help='new tokens per row')
  parser.add_argument('--batches', default='1,8', help='batch sizes, comma separated')
  parser.add_argument('--repeats', type=int, default=5)
  return parser.parse_args()


def hf_model(kwargs):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(max_position_embeddings=512, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2, **kwargs)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(2 * torch.randn_like(param) / param.shape[-1] ** 0.5)  # 2 / sqrt(fan-in)
  return model


def seconds(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def bench(kwargs, batch, args):
  model = hf_model(kwargs)
  config = hf_llama.config_from_hf(model.config)
  lm, params = DecoderLM(**config), {'params': hf_llama.params_from_hf(model.state_dict(),
                                                                       config)}
  tokens = np.random.RandomState(batch).randint(3, kwargs['vocab_size'], (batch, args.prompt))
  mask = np.ones_like(tokens, bool)
  tokens_torch, mask_torch = torch.tensor(tokens), torch.tensor(mask)

  def ours(fn):
    out = fn(lm, params, prompt_tokens=tokens, prompt_mask=mask, max_new_tokens=args.new)
    return np.asarray(jax.block_until_ready(out['tokens']))

  def hf():
    with torch.no_grad():
      out = model.generate(tokens_torch, attention_mask=mask_torch, do_sample=False,
                           max_new_tokens=args.new, eos_token_id=None, use_cache=True)
    return out[:, args.prompt:].numpy()

  runs = {'cache': lambda: ours(gen.generate),
          'no cache': lambda: ours(gen.generate_without_cache), 'hf': hf}
  outputs = {name: run() for name, run in runs.items()}  # warm-up: compiles
  times = {name: [] for name in runs}
  for _ in range(args.repeats):
    for name, run in runs.items():
      elapsed, _ = seconds(run)
      times[name].append(elapsed)
  tokens_per_s = {name: batch * args.new / statistics.median(t) for name, t in times.items()}
  same = (outputs['cache'] == outputs['hf']).all() and (outputs['cache'] ==
                                                       outputs['no cache']).all()
  return tokens_per_s, same


def main():
  args = parse_args()
  print(f'prompt {args.prompt} tokens, {args.new} new tokens, greedy, float32, '
        f'medians of {args.repeats}; jax {jax.__version__} on {jax.devices()[0].platform}, '
        f'torch {torch.__version__} ({torch.get_num_threads()} threads), '
        f'transformers {transformers.__version__}\n')
  print('| model | batch | ours cache tok/s | ours no cache tok/s | HF generate tok/s '
        '| cache / no cache | cache / HF | tokens equal |')
  print('|---|---:|---:|---:|---:|---:|---:|---|')
  for name, kwargs in MODELS.items():
    for batch in (int(b) for b in args.batches.split(',')):
      speed, same = bench(kwargs, batch, args)
      print(f"| {name} | {batch} | {speed['cache']:.0f} | {speed['no cache']:.0f} "
            f"| {speed['hf']:.0f} | {speed['cache'] / speed['no cache']:.2f} "
            f"| {speed['cache'] / speed['hf']:.2f} | {'yes' if same else 'no'} |", flush=True)
  print('\ncommand: ' + ' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] +
                                  sys.argv[1:]))


if __name__ == '__main__':
  main()
