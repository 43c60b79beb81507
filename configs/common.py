"""The training block every family config shares: the keys `mmjax.train` reads.

A family config adds it with what differs and sets its own keys around it:

  config.update(common.training(batch_size=64, total_steps=300, lr=1e-3, wd=0.1,
                                warmup_steps=30, end_lr_fraction=0.0, b2=0.98, eps=1e-6,
                                eval_every=150, checkpoint_every=100))

Every key has its one default here; library code reads the keys without defaults of its own.
"""

from ml_collections import config_dict


def training(*, batch_size: int, total_steps: int, lr: float, wd: float, warmup_steps: int,
             end_lr_fraction: float, b2: float, eps: float, eval_every: int,
             checkpoint_every: int, b1: float = 0.9, log_every: int = 25,
             trainable: str | None = None) -> dict:
  """The training keys of a config, as a dict for `config.update(...)`.

  Args:
    batch_size: the global batch (over all processes and devices).
    total_steps: optimizer steps of the run.
    lr, wd: AdamW's peak learning rate and decoupled weight decay (on matrices only, not on
      norms, biases or scalars).
    warmup_steps, end_lr_fraction: linear warmup, then cosine decay to end_lr_fraction * lr.
    b1, b2, eps: Adam's moments.
    eval_every, checkpoint_every, log_every: in steps.
    trainable: a regex fully matched against each param's '/'-joined path; the others get no
      update, no weight decay and no optimizer state (None: every param trains).
  """
  return dict(
      seed=0,
      trainable=config_dict.placeholder(str) if trainable is None else trainable,
      batch_size=batch_size,
      total_steps=total_steps,
      grad_accum_steps=1,  # micro-batches per step
      compute_dtype='float32',  # or 'bfloat16' (parameters stay float32)
      lr=lr,
      wd=wd,
      schedule=dict(warmup_steps=warmup_steps, end_lr_fraction=end_lr_fraction),
      # mu_dtype: the first moment's dtype ('bfloat16' halves it; None = the params' float32).
      adam=dict(b1=b1, b2=b2, eps=eps, mu_dtype=config_dict.placeholder(str)),
      grad_clip_norm=1.0,  # global norm over the trainable params
      # Devices per mesh axis; -1 = the remaining devices (mmjax/sharding.py).
      mesh=dict(data=-1, fsdp=1, tensor=1),
      log_every=log_every,
      eval_every=eval_every,
      checkpoint_every=checkpoint_every,
      keep_checkpoints=2,
      record_example_ids=False,  # write the example ids of every step to the workdir
      # A step whose loss, gradient norm or new params are not finite is never applied;
      # 'stop': the run then stops with an error naming the step (before saving anything
      # after it); 'skip': it goes on and counts such steps (train/nonfinite_steps).
      nonfinite='stop',
      # A fault for tests of that policy: the gradient of this step (1-based) becomes NaN.
      inject_nonfinite_at_step=config_dict.placeholder(int),
  )
