"""Training rows for an early-fusion decoder (Chameleon): text -> image rows, and the image
question rows of `mmjax.data.instruct`, in one vocabulary (`EarlyFusionTokenizer`).

Row kinds (`config.data.weights` mixes them with instruct's question kinds):
  emoji_caption_to_image  `[BOS] '<name>.' [begin] <image>*N [end]`: the loss on the codes
                          and the end-image marker; with probability `caption_dropout` the
                          row is `[BOS] [begin] <image>*N [end]` (no caption), so the model
                          also learns images unconditionally, which classifier-free
                          guidance subtracts. Emoji `train` split, images not augmented
                          (the model learns to draw the images as they are).
  (instruct's kinds)      `[BOS] [begin] <image>*N [end] 'question: <q> answer: ' <answer>
                          [EOS]`, the loss on the answer (LLaVA's rows, `instruct`).
The `<image>` placeholders become the image's VQ codes in the train step
(`mmjax.models.chameleon.Chameleon.image_token_ids`), targets included: the tokenizer runs on
the accelerator, batched and sharded with the batch, on the augmented images the iterator
yields, instead of once on the host.

Elements as `instruct.train_iterator`'s (image, tokens, targets, loss_weights, example_id,
kind: the index in `KINDS`).
"""

import functools

import grain
import numpy as np

from mmjax.data import instruct
from mmjax.data import pipeline
from mmjax.data.images import prepare_image
from mmjax.data.pipeline import split_source, split_texts
from mmjax.data.tokenizers.byte import BOS_ID, PAD_ID

CAPTION_TO_IMAGE = 'emoji_caption_to_image'
KINDS = (*instruct.QUESTION_KINDS, CAPTION_TO_IMAGE)  # `kind` ids: the index here


def caption_prompt(tokenizer, caption: str | None) -> np.ndarray:
  """int32: `[BOS] '<caption>.' [begin]` (`[BOS] [begin]` for None): a text -> image
  prompt, continued by the image's codes."""
  text = tokenizer.encode_text(f'{caption}.') if caption is not None else np.zeros(0, np.int32)
  return np.concatenate([[BOS_ID], text, [tokenizer.begin_image_id]]).astype(np.int32)


def caption_to_image_rows(tokenizer, captions, *, num_image_tokens: int,
                          max_len: int) -> dict[str, np.ndarray]:
  """Rows `caption_prompt` + `<image>*N [end]` for each caption and, last, for None.

  Returns tokens and targets int32 [n + 1, max_len] (targets: tokens shifted left by one,
  pad last), loss_weights float32 [n + 1, max_len] (1 where the target is a code
  placeholder or the end-image marker) and caption_cut bool [n + 1]. A caption that does
  not fit is cut from its end.
  """
  image_room = 1 + num_image_tokens + 2  # BOS, the image with its markers
  if max_len < image_room:
    raise ValueError(f'max_len={max_len} cannot hold an image of {num_image_tokens} tokens '
                     'with its markers')
  rows = len(captions) + 1
  tokens = np.full((rows, max_len), PAD_ID, np.int32)
  loss_weights = np.zeros((rows, max_len), np.float32)
  caption_cut = np.zeros(rows, bool)
  image = tokenizer.image_ids(num_image_tokens)[1:]  # `<image>*N [end]`
  for row, caption in enumerate([*captions, None]):
    prompt = caption_prompt(tokenizer, caption)
    if len(prompt) + len(image) > max_len:
      caption_cut[row] = True
      prompt = np.concatenate([prompt[:max_len - len(image) - 1], prompt[-1:]])
    ids = np.concatenate([prompt, image])
    tokens[row, :len(ids)] = ids
    loss_weights[row, len(prompt) - 1:len(ids) - 1] = 1
  targets = np.concatenate([tokens[:, 1:], np.full((rows, 1), PAD_ID, np.int32)], axis=1)
  return dict(tokens=tokens, targets=targets, loss_weights=loss_weights,
              caption_cut=caption_cut)


def _caption_example(position, rng, *, source, rows, image_size, caption_dropout):
  """Element `position` of the text -> image stream: its caption dropped with probability
  `caption_dropout` (the last row of `rows` is the captionless one)."""
  row = len(rows['tokens']) - 1 if rng.random() < caption_dropout else position
  return {
      'image': prepare_image(source[position]['image'], 'emoji', image_size),
      'tokens': rows['tokens'][row],
      'targets': rows['targets'][row],
      'loss_weights': rows['loss_weights'][row],
      'example_id': np.int32(position),
      'kind': np.int32(KINDS.index(CAPTION_TO_IMAGE)),
  }


def caption_stream(data_dir: str, *, tokenizer, num_image_tokens: int, max_len: int,
                   image_size: int, seed: int, caption_dropout: float):
  """The endless `grain.MapDataset` of text -> image examples (emoji `train`)."""
  source = split_source('emoji', 'train', data_dir)
  names = [x['name'] for x in split_texts('emoji', 'train', data_dir)]
  rows = caption_to_image_rows(tokenizer, names, num_image_tokens=num_image_tokens,
                               max_len=max_len)
  if rows.pop('caption_cut').any():
    raise ValueError(f'max_len={max_len} cuts emoji captions; the longest row needs '
                     f'{max(len(n) for n in names) + num_image_tokens + 5} tokens')
  shuffle_seed, map_seed = np.random.SeedSequence(
      [seed, KINDS.index(CAPTION_TO_IMAGE)]).generate_state(2)
  example = functools.partial(_caption_example, source=source, rows=rows,
                              image_size=image_size, caption_dropout=caption_dropout)
  return (grain.MapDataset.range(len(names)).shuffle(seed=int(shuffle_seed)).repeat()
          .random_map(example, seed=int(map_seed)))


def select_kinds(weights) -> dict[str, float]:
  """{kind: weight} with a positive weight and installed data (instruct's kinds as
  `instruct.select_kinds`); an unknown kind raises ValueError naming it."""
  unknown = sorted(set(weights) - set(KINDS))
  if unknown:
    raise ValueError(f'unknown row kinds {unknown}; known: {list(KINDS)}')
  questions = {k: w for k, w in weights.items() if k in instruct.QUESTION_KINDS and w > 0}
  kinds = instruct.select_kinds(questions) if questions else {}
  if weights.get(CAPTION_TO_IMAGE, 0) > 0:
    kinds[CAPTION_TO_IMAGE] = weights[CAPTION_TO_IMAGE]
  if not kinds:
    raise ValueError(f'weights={dict(weights)} give no row kind a positive weight')
  return kinds


def build(data_dir: str, kinds) -> None:
  instruct.build(data_dir, [k for k in kinds if k in instruct.QUESTION_KINDS])
  if CAPTION_TO_IMAGE in kinds:
    pipeline.build('emoji', data_dir)


def train_iterator(data_dir: str, *, tokenizer, weights, num_image_tokens: int, max_len: int,
                   image_size: int, global_batch_size: int, seed: int, caption_dropout: float,
                   process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                   augment: bool = True):
  """Infinite grain iterator of this host's batches, the kinds mixed by `weights`
  (`augment`: the question rows' images, as instruct's)."""
  kinds = select_kinds(weights)
  streams = []
  for name in kinds:
    if name == CAPTION_TO_IMAGE:
      streams.append(caption_stream(
          data_dir, tokenizer=tokenizer, num_image_tokens=num_image_tokens, max_len=max_len,
          image_size=image_size, seed=seed, caption_dropout=caption_dropout))
    else:
      streams.append(instruct.question_stream(
          data_dir, name, tokenizer=tokenizer, num_image_tokens=num_image_tokens,
          max_len=max_len, image_size=image_size, seed=seed, augment=augment))
  ds = grain.MapDataset.mix(streams, list(kinds.values()))
  return pipeline.host_batches(ds, global_batch_size=global_batch_size,
                               process_index=process_index, process_count=process_count,
                               worker_count=worker_count)
