r"""Screening baseline for issue 22: a 4-layer CNN + bag-of-words text CLIP on the emoji
images held in memory, with any drawing style held out (the quick try `../shared/DATA.md`
quotes). Not an mmjax model: a reference point for the small CLIP recipe, minutes on 2 cores.

  python experiments/cnn_bow_screen.py --hold_style=noto --seconds=200
  python experiments/cnn_bow_screen.py --hold_style=noto --paired --image_image_weight=0.5

Train = every other style x the dataset's seen names; test = the held-out style x the seen
names it draws, ranked among those names (top-1 / top-5). `--paired` fills each batch with
B/2 names drawn twice in two styles, the softmax targets spread over all rows of the same
name (multi-positive); `--image_image_weight` adds a contrastive loss between those images.
Results: docs/clip.md (round 3).
"""

import argparse
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from mmjax import config_lib
from mmjax.data import pipeline

SPLITS = ('train', 'test_seen', 'test_unseen', 'support_unseen')


def load_rows(data_dir):
  """[(split, style, name, uint8 image)] over every split of the built emoji dataset."""
  pipeline.build('emoji', data_dir)
  rows = []
  for split in SPLITS:
    source = pipeline.split_source('emoji', split, data_dir)
    for i in range(len(source)):
      x = source[i]
      rows.append((split, x['style'].decode(), x['name'].decode(), x['image']))
  return rows


def words(name):
  return re.findall(r'[a-z0-9]+', name.lower())


class ConvTower(nn.Module):
  @nn.compact
  def __call__(self, x):  # [b, S, S, 3] -> [b, 256]
    for channels in (32, 64, 128, 256):
      x = nn.max_pool(nn.gelu(nn.LayerNorm()(nn.Conv(channels, (3, 3))(x))), (2, 2), (2, 2))
    return nn.Dense(256)(x.mean((1, 2)))


class BagOfWords(nn.Module):
  vocab_size: int

  @nn.compact
  def __call__(self, ids):  # int [b, L] (0 = padding) -> [b, 256]
    mask = (ids > 0)[..., None]
    x = (nn.Embed(self.vocab_size, 256)(ids) * mask).sum(1) / jnp.maximum(mask.sum(1), 1)
    return nn.Dense(256)(nn.gelu(nn.Dense(256)(x)))


class DualEncoder(nn.Module):
  vocab_size: int

  @nn.compact
  def __call__(self, images, ids):
    normalize = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    scale = self.param('log_scale', lambda _: jnp.array(np.log(1 / 0.07)))
    return normalize(ConvTower()(images)), normalize(BagOfWords(self.vocab_size)(ids)), scale


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default='')  # '' = $MMJAX_DATA_DIR, as mmjax.train
  parser.add_argument('--hold_style', default='noto')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--seconds', type=float, default=240)
  parser.add_argument('--max_steps', type=int, default=3000)  # the cosine schedule's length
  parser.add_argument('--paired', action='store_true')
  parser.add_argument('--image_image_weight', type=float, default=0.0)
  args = parser.parse_args()
  data_dir = config_lib.data_dir(ml_collections.ConfigDict({'data': {'data_dir': args.data_dir}}))

  rows = load_rows(data_dir)
  seen = {name for split, _, name, _ in rows if split in ('train', 'test_seen')}
  train = [r for r in rows if r[2] in seen and r[1] != args.hold_style]
  test = [r for r in rows if r[2] in seen and r[1] == args.hold_style]
  if not test:
    raise SystemExit(f'--hold_style={args.hold_style!r}: no such style in the emoji dataset '
                     f'(styles: {sorted({r[1] for r in rows})})')
  size = args.image_size
  pixels = lambda rs: np.stack([np.asarray(Image.fromarray(r[3]).resize(
      (size, size), Image.BILINEAR)) for r in rs]).astype(np.float32) / 127.5 - 1
  train_x, test_x = pixels(train), pixels(test)
  vocab = {w: i + 1 for i, w in enumerate(sorted({w for n in seen for w in words(n)}))}
  encode = lambda n: ([vocab[w] for w in words(n)][:12] + [0] * 12)[:12]
  train_names = sorted({r[2] for r in train})
  train_label = np.array([train_names.index(r[2]) for r in train])
  train_ids = np.array([encode(r[2]) for r in train])
  rows_of = {}
  for i, label in enumerate(train_label):
    rows_of.setdefault(label, []).append(i)
  multi_style = [label for label, rs in rows_of.items() if len(rs) >= 2]
  print(f'train {len(train)} images ({sorted({r[1] for r in train})}), test {len(test)} '
        f'({args.hold_style})', flush=True)

  model = DualEncoder(len(vocab) + 1)
  params = model.init(jax.random.key(0), train_x[:2], train_ids[:2])
  optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 100, args.max_steps),
                          weight_decay=0.1)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, images, ids, labels):
    def loss_fn(params):
      image_emb, text_emb, log_scale = model.apply(params, images, ids)
      logits = jnp.exp(log_scale) * image_emb @ text_emb.T
      same = (labels[:, None] == labels[None, :]).astype(jnp.float32)
      target = same / same.sum(1, keepdims=True)
      loss = (optax.softmax_cross_entropy(logits, target).mean() +
              optax.softmax_cross_entropy(logits.T, target).mean()) / 2
      if args.image_image_weight:
        eye = jnp.eye(len(labels))
        other = same - eye
        has = other.sum(1) > 0
        image_logits = jnp.exp(log_scale) * image_emb @ image_emb.T - 1e9 * eye
        per_row = optax.softmax_cross_entropy(
            image_logits, other / jnp.maximum(other.sum(1, keepdims=True), 1))
        loss += args.image_image_weight * jnp.where(has, per_row, 0).sum() / jnp.maximum(
            has.sum(), 1)
      return loss
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)

  def random_shift(x):  # pad with white by size/8 and crop back: a random translation
    pad = size // 8
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=1.0)
    shifts = rng.integers(0, 2 * pad + 1, (len(x), 2))
    return np.stack([padded[i, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(shifts)])

  def batch_rows():
    if not args.paired:
      return rng.choice(len(train_x), args.batch_size, replace=False)
    labels = rng.choice(multi_style, args.batch_size // 2, replace=False)
    return np.array([i for k in labels for i in rng.choice(rows_of[k], 2, replace=False)])

  start, steps = time.time(), 0
  while time.time() - start < args.seconds and steps < args.max_steps:
    rows_now = batch_rows()
    params, opt_state, loss = step(params, opt_state, jnp.asarray(random_shift(train_x[rows_now])),
                                   jnp.asarray(train_ids[rows_now]),
                                   jnp.asarray(train_label[rows_now]))
    steps += 1
    if steps % 100 == 0:
      print(f'step {steps} loss {float(loss):.3f} '
            f'{steps * args.batch_size / (time.time() - start):.0f} ex/s', flush=True)

  test_names = sorted({r[2] for r in test})
  image_emb, _, _ = model.apply(params, test_x, train_ids[:1])
  _, text_emb, _ = model.apply(params, test_x[:1], np.array([encode(n) for n in test_names]))
  label = np.array([test_names.index(r[2]) for r in test])
  top = np.argsort(-np.asarray(image_emb @ text_emb.T), 1)
  print(f'held out {args.hold_style}, {steps} steps x {args.batch_size}: seen top-1 '
        f'{(top[:, 0] == label).mean():.3f}, top-5 {(top[:, :5] == label[:, None]).any(1).mean():.3f} '
        f'over {len(test_names)} names', flush=True)


if __name__ == '__main__':
  main()
