"""Pretrained parts from our own training runs, for `Task.pretrained_params` (`config.init`).

`config.init = dict(vision_from='', lm_from='', params_from='', params_parts='')`, each
`*_from` a workdir of ours ('' = none; the newest checkpoint is read, no model needed):
  params_from  every top-level param subtree of that run (e.g. stage 1 -> stage 2), or only
               those that `params_parts` names (comma separated, e.g. 'resampler': a
               trained part under fresh others);
  vision_from  a CLIP run: its image tower, cut to a `vision_tower` of the config's vision
               depth (`vit.vision_params_from_clip`: CLIP's penultimate layer);
  lm_from      any run with an `lm` (a text-only LLaVA run, a Flamingo `lm` stage): its LM.
Later keys override earlier ones in that order.
"""

from mmjax import checkpoint
from mmjax.models.vit import vision_params_from_clip


def newest_params(workdir: str) -> dict:
  """The params of the newest checkpoint in `workdir` (a training run of ours), as numpy."""
  reader = checkpoint.CheckpointReader(f'{workdir}/checkpoints')
  try:
    return reader.numpy_params(reader.resolve_step(None))
  finally:
    reader.close()


def newest_config(workdir: str) -> dict:
  """The config saved with the newest checkpoint in `workdir`, as a plain dict."""
  reader = checkpoint.CheckpointReader(f'{workdir}/checkpoints')
  try:
    config = reader.config(reader.resolve_step(None))
  finally:
    reader.close()
  if config is None:
    raise ValueError(f'{workdir}: its newest checkpoint was saved without a config')
  return config


def _part(workdir: str, key: str, part: str, what: str) -> dict:
  params = newest_params(workdir)
  if part not in params:
    raise ValueError(f'config.init.{key}={workdir!r} holds no {what} (top-level params: '
                     f'{sorted(params)})')
  return params[part]


def init_parts(init, vision=None) -> dict:
  """{top-level param name: numpy subtree} of the workdirs named in `init` (`config.init`).

  vision: the config's vision tower kwargs (`config.model.vision`: `depth`, `scan`), needed
    for `vision_from`.
  """
  loaded = {}
  parts = [part.strip() for part in init.params_parts.split(',') if part.strip()]
  if parts and not init.params_from:
    raise ValueError(f'config.init.params_parts={init.params_parts!r} needs '
                     'config.init.params_from')
  if init.params_from:
    params = newest_params(init.params_from)
    missing = sorted(set(parts) - set(params))
    if missing:
      raise ValueError(f'config.init.params_parts: {init.params_from!r} holds no {missing} '
                       f'(top-level params: {sorted(params)})')
    loaded.update({name: tree for name, tree in params.items() if not parts or name in parts})
  if init.get('vision_from'):
    if vision is None:
      raise ValueError(f'config.init.vision_from={init.vision_from!r}: this model has no '
                       'vision tower')
    clip_image = _part(init.vision_from, 'vision_from', 'image_tower', 'CLIP image tower')
    loaded['vision_tower'] = vision_params_from_clip(clip_image, depth=vision['depth'],
                                                     scan=vision['scan'])
  if init.lm_from:
    loaded['lm'] = _part(init.lm_from, 'lm_from', 'lm', 'LM')
  return loaded
