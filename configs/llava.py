r"""LLaVA: a CLIP vision tower's penultimate-layer features -> projector -> decoder LM.

`--config configs/llava.py:VARIANT[,STAGE]`
  variants  tiny (tests: seconds), small (a 2-core CPU, minutes; numbers in docs/llava.md)
  stages    stage2 (default): projector + LM train, the vision tower is frozen;
            stage1: the projector alone trains (LLaVA's feature alignment);
            text_only: the same LM on the same rows without the image (the baseline).

The data are image questions built from the emoji and Tux Paint sets (`mmjax/data/instruct.py`):
"What is this?" -> the emoji's name, "Which group does this emoji belong to?", "Describe the
image." -> the Tux Paint sentence, "Which category is this?". Loss on answer tokens only.

  # a CLIP of ours gives the vision tower (its image tower minus the last block)
  python -m mmjax.train --config configs/clip.py:small --workdir workdirs/clip_small
  python -m mmjax.train --config configs/llava.py:small \
      --config.init.vision_from=workdirs/clip_small --workdir workdirs/llava_small
  python -m mmjax.train --config configs/llava.py:small,text_only --workdir workdirs/lm_small
  # two stages: the projector alone on a trained LM, then projector + LM
  python -m mmjax.train --config configs/llava.py:small,stage1 \
      --config.init.vision_from=workdirs/clip_small --config.init.lm_from=workdirs/lm_small \
      --workdir workdirs/llava_stage1
  python -m mmjax.train --config configs/llava.py:small \
      --config.init.params_from=workdirs/llava_stage1 --workdir workdirs/llava_stage2
"""

from ml_collections import config_dict

from configs import common

# `config.trainable` of each stage: a regex over '/'-joined param paths (mmjax.train).
TRAINABLE = {
    'stage1': r'projector/.*',
    'stage2': r'(projector|lm)/.*',
    'text_only': r'lm/.*',
}
# Byte-level ids of mmjax.data.tokenizers.ByteLMTokenizer: 256 bytes, pad, BOS, EOS, <image>.
VOCAB_SIZE = 260
IMAGE_TOKEN_ID = 259


def get_config(arg: str = 'tiny') -> config_dict.ConfigDict:
  variant, _, stage = arg.partition(',')
  stage = stage or 'stage2'
  if stage not in TRAINABLE:
    raise ValueError(f'configs/llava.py: unknown stage {stage!r}; use one of {list(TRAINABLE)}')
  config = config_dict.ConfigDict()
  config.variant = arg
  config.task = 'llava'
  config.text_only = stage == 'text_only'

  config.data = dict(
      data_dir='',  # '' = $MMJAX_DATA_DIR, else ~/.cache/mmjax/datasets
      image_size=8,
      max_len=128,  # training rows [BOS] [IMAGE]*n 'question: ... answer: ' answer [EOS]
      prompt_len=config_dict.placeholder(int),  # eval prompts; None = the longest prompt
      num_image_tokens=16,  # (image_size / patch_size)**2, 0 with text_only (checked)
      # Question kinds and their share of the training rows (mmjax.data.instruct).
      weights=dict(emoji_name=1.0, emoji_group=1.0, tuxpaint_caption=1.0,
                   tuxpaint_category=1.0),
      augment=True,
      worker_count=0,
  )

  config.model = dict(
      # Our ViT (CLIP layout) with `depth` = the CLIP tower's depth - 1: LLaVA reads the
      # penultimate layer (class token dropped), so the last block is not kept.
      vision=dict(patch_size=2, width=32, depth=1, num_heads=2, mlp_ratio=4.0,
                  activation='gelu', layer_norm_eps=1e-5, scan=True),
      projector_kind='mlp',  # 'linear' (LLaVA-1) or 'mlp' (LLaVA-1.5, mlp2x_gelu)
      projector_bias=True,
      # Llama-style decoder (mmjax.models.decoder.DecoderLM).
      language_model=dict(vocab_size=VOCAB_SIZE, width=32, depth=2, num_heads=2,
                          num_kv_heads=1, mlp_dim=64, rope_theta=10_000.0, norm_eps=1e-6,
                          tie_embeddings=False, scan=True, remat='none'),
      image_token_id=IMAGE_TOKEN_ID,
  )
  # Pretrained parts loaded into fresh params (not on resume); '' = none. Each is a workdir
  # of ours (the newest checkpoint): vision_from a CLIP run (its image tower), lm_from a
  # text_only run (its LM), params_from a LLaVA run (everything, e.g. stage 1 -> stage 2,
  # or the top-level parts that params_parts names, e.g. 'projector').
  config.init = dict(vision_from='', lm_from='', params_from='', params_parts='')
  config.loss = dict(z_loss=0.0)  # weight of mean(logsumexp(logits)**2) (PaLM, Chameleon)
  config.generation = dict(max_new_tokens=48)  # greedy answers in evaluation

  config.update(common.training(
      batch_size=16, total_steps=100, lr=1e-3, wd=0.1, warmup_steps=10, end_lr_fraction=0.1,
      b2=0.95, eps=1e-8, eval_every=100, checkpoint_every=100, trainable=TRAINABLE[stage]))

  config.evals = dict(
      qa=dict(type='qa', batch_size=256),  # exact match per short-answer question kind
      captioning=dict(type='captioning', batch_size=256),  # CIDEr, BLEU-4 (Tux Paint)
  )

  if variant == 'tiny':
    config.data.weights = dict(emoji_group=1.0)
    config.data.max_len = 96
    config.evals = dict(qa=dict(type='qa', batch_size=256, kinds=('emoji_group',)))
  elif variant == 'small':
    # The vision tower of configs/clip.py:small (32 px, patch 8, width 128, 4 blocks - 1).
    config.data.image_size = 32
    config.model.vision.update(patch_size=8, width=128, depth=3, num_heads=4)
    config.model.language_model.update(width=128, depth=4, num_heads=4, num_kv_heads=2,
                                       mlp_dim=352)
    config.batch_size = 32
    config.total_steps = 1500
    config.lr = 2e-3
    config.schedule.warmup_steps = 100
    config.log_every = 50
    config.eval_every = 1500
    config.checkpoint_every = 500
  else:
    raise ValueError(f'configs/llava.py: unknown variant {variant!r}; use tiny or small')

  if config.text_only:
    config.data.num_image_tokens = 0
  else:
    patches = (config.data.image_size // config.model.vision.patch_size) ** 2
    config.data.num_image_tokens = patches
  config.lock()
  return config
