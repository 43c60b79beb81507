r"""Flamingo: a frozen LM reads resampled image latents through gated cross-attention.

`--config configs/flamingo.py:VARIANT[,STAGE]`
  variants  tiny (tests: seconds), small (a 2-core CPU, minutes)
  stages    xattn (default): the Perceiver resampler, the media projection (only when the
            vision and LM widths differ) and the tanh-gated cross-attention blocks train;
            the vision tower and the LM are frozen;
            lm: the LM alone trains on the same sequences, the gates stay at 0 so the images
            cannot matter (the text pretraining of the LM that `xattn` then freezes).

The data are interleaved sequences of K emoji and their captions (`mmjax/data/interleaved.py`):
`<image> an emoji of <name>.<eoc> <image> ...`, loss on the caption tokens; half of the chunks
after the first show again the thing of an earlier chunk in another drawing style.
Evaluation: 0/1/4-shot ranking of candidate names for emoji of the held-out style
(`mmjax/evals/fewshot.py`), with the demonstrations drawn from the candidates (`fewshot`) or
from other names (`fewshot_format`: they show only the format), or retrieved among the
candidates' drawings by the frozen vision tower's similarity to the query (`fewshot_retrieved`:
RICES, as Flamingo's few-shot classification); `fewshot_unseen`, `fewshot_retrieved_unseen`:
the same for names never trained on, known only from the demonstrations;
`fewshot_cued_unseen`: 4 shots of new names whose text says which demonstration shows the
answer (cue digits, `experiments/flamingo/curricula.py`), a diagnostic of the LM's copying;
`fewshot_generated(_unseen)`: open-ended, the name the model writes (greedy, KV cache) after
retrieved demonstrations must be the answer exactly.

  # a CLIP of ours gives the vision tower; the LM learns the interleaved text first
  python -m mmjax.train --config configs/clip.py:small --workdir workdirs/clip_small
  python -m mmjax.train --config configs/flamingo.py:small,lm --workdir workdirs/flamingo_lm
  python -m mmjax.train --config configs/flamingo.py:small \
      --config.init.vision_from=workdirs/clip_small --config.init.lm_from=workdirs/flamingo_lm \
      --workdir workdirs/flamingo_small
"""

from ml_collections import config_dict

from configs import common

# Byte-level ids of mmjax.data.tokenizers.ByteLMTokenizer: 256 bytes, pad, BOS, EOS (= end of
# chunk), <image>.
VOCAB_SIZE = 260

# The few-shot rows of `fewshot_cued_unseen`: cue digits after each `<image>` (a curriculum
# with cues, see its docstring; `cue_at=name` puts them before the names).
CUED = 'experiments/flamingo/curricula.py:cue_prob=1.0'

# `config.trainable` of each stage: a regex over '/'-joined param paths (mmjax.train).
TRAINABLE = {
    'xattn': r'(resampler|gated_xattn|media_projection)/.*',
    'lm': r'lm/.*',
}


def get_config(arg: str = 'tiny') -> config_dict.ConfigDict:
  variant, _, stage = arg.partition(',')
  stage = stage or 'xattn'
  if stage not in TRAINABLE:
    raise ValueError(f'configs/flamingo.py: unknown stage {stage!r}; use one of '
                     f'{list(TRAINABLE)}')
  config = config_dict.ConfigDict()
  config.variant = arg
  config.task = 'flamingo'

  config.data = dict(
      data_dir='',  # '' = $MMJAX_DATA_DIR, else ~/.cache/mmjax/datasets
      image_size=8,
      images_per_sequence=3,  # K (image, caption) chunks per training sequence
      max_len=128,  # [BOS] (<image> 'an emoji of <name>.' <eoc>) * K, right padded
      repeat_prob=0.5,  # chunk j > 0 shows an earlier chunk's thing again (another drawing)
      # '' (the plain format) or 'FILE.py:KEY=VALUE,...': a research curriculum and its
      # options (mmjax.data.interleaved.load_curriculum; experiments/flamingo/curricula.py)
      curriculum='',
      augment=True,
      worker_count=0,
  )

  config.model = dict(
      # Our ViT (CLIP layout) with `depth` = the CLIP tower's depth - 1, as LLaVA's tower.
      vision=dict(patch_size=2, width=16, depth=1, num_heads=2, mlp_ratio=4.0,
                  activation='gelu', layer_norm_eps=1e-5, scan=True),
      # mmjax.models.resampler.PerceiverResampler kwargs.
      resampler=dict(layout='flamingo', num_latents=4, depth=1, num_heads=2, head_dim=8,
                     mlp_ratio=2, max_images=None),
      # The decoder of configs/llava.py (same variant), so a text-only LLaVA run loads in.
      language_model=dict(vocab_size=VOCAB_SIZE, width=32, depth=2, num_heads=2,
                          num_kv_heads=1, mlp_dim=64, rope_theta=10_000.0, norm_eps=1e-6,
                          tie_embeddings=False, scan=True, remat='none'),
      cross_attn_every=1,  # a gated block before every this-many-th LM layer
      only_attend_immediate_media=True,
      xattn_heads=2,
      xattn_head_dim=16,
      xattn_mlp_ratio=2,
  )
  # Pretrained parts loaded into fresh params (not on resume); '' = none. Each is a workdir
  # of ours (the newest checkpoint): vision_from a CLIP run (its image tower), lm_from a
  # LLaVA text_only run or a Flamingo run (its LM), params_from a Flamingo run (everything,
  # or the top-level parts that params_parts names, e.g. 'resampler').
  config.init = dict(vision_from='', lm_from='', params_from='', params_parts='')
  config.loss = dict(z_loss=0.0)

  config.update(common.training(
      batch_size=8, total_steps=100, lr=1e-3, wd=0.1, warmup_steps=10, end_lr_fraction=0.1,
      b2=0.95, eps=1e-8, eval_every=100, checkpoint_every=100, trainable=TRAINABLE[stage]))

  # Rank `num_candidates` names (chance: 1 / num_candidates) after 0, 1 and 4 demonstrations
  # drawn from the candidates (`fewshot`), from other names (`fewshot_format`) or the most
  # similar drawings of the candidates (`fewshot_retrieved`); `*_unseen`: the same for new
  # names, never trained on, whose only labelled drawings are the demonstrations.
  fewshot = dict(type='fewshot', shots=(0, 1, 4), num_queries=256, num_candidates=10,
                 batch_size=64, seed=0, demonstrations='candidates', names='seen')
  config.evals = dict(
      fewshot=fewshot,
      fewshot_format=dict(fewshot, shots=(1, 4), demonstrations='other_names'),
      fewshot_retrieved=dict(fewshot, shots=(1, 4), demonstrations='retrieved'),
      fewshot_unseen=dict(fewshot, names='unseen'),
      fewshot_retrieved_unseen=dict(fewshot, shots=(1, 4), demonstrations='retrieved',
                                    names='unseen'),
      # Diagnostic: cue digits in the text say which demonstration shows the answer (`CUED`),
      # so a model that copies the right one scores without pictures.
      fewshot_cued_unseen=dict(fewshot, shots=(4,), names='unseen', curriculum=CUED),
      # Open-ended: the name the model writes after the prompt must be the answer exactly.
      fewshot_generated=dict(fewshot, demonstrations='retrieved', mode='generate'),
      fewshot_generated_unseen=dict(fewshot, demonstrations='retrieved', names='unseen',
                                    mode='generate'),
  )
  # Greedy captions of `mode='generate'` evals: ' <name>.' and the end of chunk.
  config.generation = dict(max_new_tokens=48)

  if variant == 'tiny':
    for evaluator in config.evals.values():
      evaluator.update(num_queries=8, num_candidates=4, batch_size=32)
  elif variant == 'small':
    # The vision tower of configs/clip.py:small (32 px, patch 8, width 128, 4 blocks - 1) and
    # the decoder of configs/llava.py:small.
    config.data.update(image_size=32, images_per_sequence=4, max_len=160)
    config.model.vision.update(patch_size=8, width=128, depth=3, num_heads=4)
    config.model.resampler.update(num_latents=16, depth=2, num_heads=4, head_dim=32, mlp_ratio=4)
    config.model.language_model.update(width=128, depth=4, num_heads=4, num_kv_heads=2,
                                       mlp_dim=352)
    config.model.update(cross_attn_every=2, xattn_heads=4, xattn_head_dim=32, xattn_mlp_ratio=4)
    config.batch_size = 32
    config.total_steps = 1000
    config.lr = 1e-3
    config.schedule.warmup_steps = 100
    config.log_every = 50
    config.eval_every = 1000
    config.checkpoint_every = 500
  else:
    raise ValueError(f'configs/flamingo.py: unknown variant {variant!r}; use tiny or small')
  config.lock()
  return config
