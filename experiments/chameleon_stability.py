r"""Ablation: what keeps early-fusion training stable (Chameleon, Team 2024, section 2.3):
QK-norm, z-loss and Chameleon-34B's norm reordering ('swin'), added one after another, each
at four peak learning rates, on `configs/chameleon.py:small,stability` (a 4-layer, width-128
decoder over text and 8x8 VQ codes), each trained STEPS steps x 32.

  python -m mmjax.experiment experiments/vq_codebook.py --workdir workdirs/vq_codebook \
      --arm base   # the frozen tokenizer these runs read (250 steps of configs/vq.py:small)
  python -m mmjax.experiment experiments/chameleon_stability.py \
      --workdir workdirs/chameleon_stability

Arms: none (no QK-norm, no z-loss, pre-norm), qk_norm, qk_norm_z_loss (z-loss 1e-5),
swin (QK-norm + z-loss + swin placement). Non-finite steps are skipped and counted
(`config.nonfinite='skip'`). Reported on held-out rows (`mmjax/evals/stability.py`): text and
image loss, mean output logsumexp, the largest attention logit, `diverged` (a non-finite
statistic or a loss above ln V) and the number of skipped steps.
"""

import ml_collections

STEPS = 150


def get_config():
  return ml_collections.ConfigDict(dict(
      base='configs/chameleon.py:small,stability',
      overrides=dict(
          batch_size=16, total_steps=STEPS, eval_every=STEPS, checkpoint_every=STEPS,
          log_every=25, schedule=dict(warmup_steps=STEPS // 10),
          model=dict(language_model=dict(width=64, num_heads=4, num_kv_heads=2, mlp_dim=176)),
          data=dict(max_len=144, weights=dict(emoji_caption_to_image=2.0, emoji_name=0.0,
                                              emoji_group=1.0, tuxpaint_caption=0.0,
                                              tuxpaint_category=0.0)),
          init=dict(vq_from='workdirs/vq_codebook/base/seed_0')),
      arms=dict(
          none=dict(model=dict(language_model=dict(qk_norm=False)), loss=dict(z_loss=0.0)),
          qk_norm=dict(loss=dict(z_loss=0.0)),
          qk_norm_z_loss={},
          swin=dict(model=dict(language_model=dict(norm_placement='swin'))),
      ),
      grid=dict(lr=(1e-3, 3e-3, 1e-2, 3e-2)),
      seeds=(0, 1),
      metrics=('stability/text_loss', 'stability/image_loss', 'stability/logsumexp',
               'stability/max_attention_logit', 'stability/diverged',
               'train/nonfinite_steps'),
      lower_is_better=('stability/text_loss', 'stability/image_loss', 'stability/logsumexp',
                       'stability/max_attention_logit', 'stability/diverged',
                       'train/nonfinite_steps'),
      plot_x='lr',
  ))
