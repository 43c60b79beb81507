r"""Chameleon: early fusion, one decoder over text and VQ image tokens (`mmjax/tasks/chameleon.py`).

`--config configs/chameleon.py:VARIANT`
  tiny   8 px emoji -> 4x4 codes of `configs/vq.py:tiny`'s tokenizer shape (tests: seconds;
         the tokenizer may stay random: frozen, it still tells images apart)
  small  32 px emoji -> 8x8 = 64 codes of `configs/vq.py:small`'s tokenizer, trained first
  ,stability  (after either) only the `stability` evaluation (held-out losses, logsumexp,
         max attention logit; `mmjax/evals/stability.py`), non-finite steps skipped and
         counted: the runs of `experiments/chameleon_stability.py`

The rows mix text -> image (`'<name>.' [begin] codes [end]`, 10% without the caption for
classifier-free guidance) with LLaVA's image question rows (`[begin] codes [end]` +
question -> answer); see `mmjax/data/early_fusion.py`. The decoder has Chameleon's QK-norm and
z-loss 1e-5; `model.language_model.norm_placement='swin'` is Chameleon-34B's reordering.

  python -m mmjax.train --config configs/vq.py:small --workdir workdirs/vq_small
  python -m mmjax.train --config configs/chameleon.py:small \
      --config.init.vq_from=workdirs/vq_small --workdir workdirs/chameleon_small
"""

from ml_collections import config_dict

from configs import common
from configs import vq as vq_configs

# EarlyFusionTokenizer: 260 byte-level ids, begin- and end-image, then the codes (checked).
IDS_BEFORE_CODES = 262


def vq_model(vq_config) -> dict:
  """The VQModel kwargs of a configs/vq.py config (as `mmjax.tasks.vq.model_kwargs`; the task
  checks them against the run `config.init.vq_from` names)."""
  model, quantizer = vq_config.model, vq_config.quantizer
  return dict(
      base_channels=model.base_channels, channel_multiplier=tuple(model.channel_multiplier),
      num_res_blocks=model.num_res_blocks, attn_resolutions=tuple(model.attn_resolutions),
      mid_attention=model.mid_attention, resolution=vq_config.data.image_size,
      latent_channels=model.latent_channels, num_codes=model.num_codes,
      code_dim=model.code_dim, norm_groups=model.norm_groups,
      l2_normalize=quantizer.l2_normalize, restart_dead_codes=quantizer.restart_threshold > 0,
      ema=quantizer.ema, remat=model.remat)


def get_config(arg: str = 'tiny') -> config_dict.ConfigDict:
  variant, _, purpose = arg.partition(',')
  if variant not in ('tiny', 'small') or purpose not in ('', 'stability'):
    raise ValueError(f'configs/chameleon.py: unknown variant {arg!r}; use tiny or small, '
                     'optionally followed by ,stability')
  vq_config = vq_configs.get_config(variant)
  image_size = 8 if variant == 'tiny' else 32
  vq_config.data.image_size = image_size  # the tiny tokenizer's shape, on 8 px emoji
  vq = vq_model(vq_config)
  side = image_size // 2 ** (len(vq['channel_multiplier']) - 1)

  config = config_dict.ConfigDict()
  config.variant = arg
  config.task = 'chameleon'
  config.data = dict(
      data_dir='',  # '' = $MMJAX_DATA_DIR, else ~/.cache/mmjax/datasets
      image_size=image_size,
      max_len=128,
      prompt_len=config_dict.placeholder(int),  # eval prompts; None = the longest prompt
      num_image_tokens=side * side,  # the VQ latent grid (checked)
      # Row kinds and their share (mmjax.data.early_fusion; instruct's question kinds).
      weights=dict(emoji_caption_to_image=2.0, emoji_name=1.0, emoji_group=1.0,
                   tuxpaint_caption=1.0, tuxpaint_category=1.0),
      caption_dropout=0.1,  # text -> image rows without their caption (guidance)
      augment=True,  # the question rows' images (random crop, colour jitter)
      worker_count=0,
  )
  config.model = dict(
      vq=vq,  # VQModel kwargs: must be those of the run config.init.vq_from names (checked)
      language_model=dict(
          vocab_size=IDS_BEFORE_CODES + vq['num_codes'], width=32, depth=2,
          num_heads=2, num_kv_heads=1, mlp_dim=64, rope_theta=10_000.0, norm_eps=1e-5,
          qk_norm=True, norm_placement='pre', dropout_rate=0.0, tie_embeddings=False,
          scan=True, remat='none'),
  )
  # Pretrained parts loaded into fresh params (not on resume); '' = none: vq_from a
  # configs/vq.py run (the tokenizer), lm_from any run with an `lm`, params_from a
  # Chameleon run (everything, or the top-level parts params_parts names).
  config.init = dict(vq_from='', lm_from='', params_from='', params_parts='')
  config.loss = dict(
      z_loss=1e-5,  # weight of mean(logsumexp(logits)**2) (Chameleon, PaLM)
      text_weight=1.0,  # weight of the text targets
      image_weight=1.0,  # weight of the code targets
  )
  config.generation = dict(
      max_new_tokens=48,  # greedy answers in evaluation
      image_temperature=1.0,  # image codes are sampled (text -> image evaluation)
      image_top_k=0,  # 0 = all codes
      guidance_scale=3.0,  # classifier-free guidance of the codes (1 = none)
  )
  # The dual encoder that names generated images (text_to_image evaluation): a
  # configs/clip.py run of ours at this image size; '' = no text_to_image evaluation.
  config.judge = dict(clip_workdir='')

  config.update(common.training(
      batch_size=16, total_steps=100, lr=1e-3, wd=0.1, warmup_steps=10, end_lr_fraction=0.1,
      b2=0.95, eps=1e-8, eval_every=100, checkpoint_every=100, trainable=r'lm/.*'))
  config.evals = dict(qa=dict(type='qa', batch_size=256, kinds=('emoji_group',)))

  if variant == 'tiny':
    config.data.weights = dict(emoji_caption_to_image=1.0, emoji_group=1.0)
  else:
    config.data.max_len = 192
    config.model.language_model.update(width=128, depth=4, num_heads=4, num_kv_heads=2,
                                       mlp_dim=352)
    config.batch_size = 32
    config.total_steps = 1500
    config.lr = 2e-3
    config.schedule.warmup_steps = 100
    config.log_every = 50
    config.eval_every = 1500
    config.checkpoint_every = 500
    config.evals = dict(qa=dict(type='qa', batch_size=256),
                        text_to_image=dict(type='text_to_image', batch_size=64,
                                           num_prompts=128))
  if purpose == 'stability':  # experiments/chameleon_stability.py
    config.evals = dict(stability=dict(type='stability', batch_size=64))
    config.nonfinite = 'skip'  # a diverging arm goes on, counting its skipped steps
  config.lock()
  return config
