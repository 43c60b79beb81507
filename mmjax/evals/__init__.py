"""Evaluators by name, built from `config.evals` (big_vision style).

    config.evals.zeroshot = dict(type='zeroshot', templates='hand', batch_size=256)
    config.evals.retrieval = dict(type='retrieval', dataset='tuxpaint', batch_size=256)

Each entry's `type` picks a builder `(capabilities, data, mesh, *, name, **options)`; the
entry's other keys are the builder's keyword options (an unknown one is an error naming it),
and its name prefixes the metrics (`zeroshot/heldout_style/seen/top1`). A builder takes the
capability it needs from the task's `capabilities.Capabilities` and reads its data as
`capabilities.EvalData` says, never the task. A family adds evaluators by adding builders.
"""

import inspect

from mmjax.evals import captioning
from mmjax.evals import dual_encoder
from mmjax.evals import fewshot
from mmjax.evals import reconstruction
from mmjax.evals import stability
from mmjax.evals import text_to_image

BUILDERS = {
    'zeroshot': dual_encoder.zeroshot_from_config,
    'retrieval': dual_encoder.retrieval_from_config,
    'reconstruction': reconstruction.reconstruction_from_config,
    'qa': captioning.qa_from_config,
    'captioning': captioning.captioning_from_config,
    'fewshot': fewshot.fewshot_from_config,
    'text_to_image': text_to_image.text_to_image_from_config,
    'stability': stability.stability_from_config,
}


def build(evals_config, capabilities, data, mesh) -> dict:
  """`{name: evaluator}` for every entry of `evals_config` (a ConfigDict of dicts).

  capabilities: the task's `Capabilities`; data: its `EvalData`.
  """
  evaluators = {}
  for name, eval_config in evals_config.items():
    options = dict(eval_config)
    kind = options.pop('type', None)
    if kind not in BUILDERS:
      raise ValueError(f'config.evals.{name}.type={kind!r}; known types: {sorted(BUILDERS)}')
    builder = BUILDERS[kind]
    parameters = inspect.signature(builder).parameters
    accepted = {key for key, p in parameters.items() if p.kind == p.KEYWORD_ONLY} - {'name'}
    unknown = sorted(set(options) - accepted)
    if unknown:
      raise ValueError(f'config.evals.{name}: {kind!r} evaluators take no option {unknown[0]!r} '
                       f'(options: {sorted(accepted)})')
    missing = sorted(key for key in accepted if key not in options
                     and parameters[key].default is inspect.Parameter.empty)
    if missing:
      raise ValueError(f'config.evals.{name}.{missing[0]} is required by {kind!r} evaluators')
    evaluators[name] = builder(capabilities, data, mesh, name=name, **options)
  return evaluators
