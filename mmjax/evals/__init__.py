"""Evaluators by name, built from `config.evals` (big_vision style).

    config.evals.zeroshot = dict(type='zeroshot', templates='hand', batch_size=256)
    config.evals.retrieval = dict(type='retrieval', dataset='tuxpaint', batch_size=256)

Each entry's `type` picks a builder `(eval_config, task, mesh) -> Evaluator`; the entry's
name prefixes its metrics (`zeroshot/heldout_style/seen/top1`). A family adds its own
evaluators by adding builders here.
"""

from mmjax.evals import captioning
from mmjax.evals import dual_encoder
from mmjax.evals import fewshot
from mmjax.evals import reconstruction

BUILDERS = {
    'zeroshot': dual_encoder.zeroshot_from_config,
    'retrieval': dual_encoder.retrieval_from_config,
    'reconstruction': reconstruction.reconstruction_from_config,
    'qa': captioning.qa_from_config,
    'captioning': captioning.captioning_from_config,
    'fewshot': fewshot.fewshot_from_config,
}


def build(evals_config, task, mesh) -> dict:
  """`{name: evaluator}` for every entry of `evals_config` (a ConfigDict of dicts)."""
  evaluators = {}
  for name, eval_config in evals_config.items():
    kind = eval_config.get('type')
    if kind not in BUILDERS:
      raise ValueError(f'config.evals.{name}.type={kind!r}; known types: {sorted(BUILDERS)}')
    evaluators[name] = BUILDERS[kind](eval_config, task, mesh)
  return evaluators
