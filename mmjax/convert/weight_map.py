"""A table of torch tensor <-> mmjax param correspondences, applied in either direction.

A `Rule` ties one tensor of a torch `state_dict` (`hf_key`) to one or more of our params
(`paths`, '/'-joined, e.g. `text_tower/ln_final/scale`), with the transform each way.
A list of rules describes a whole model; `to_ours` and `to_hf` apply it, checking every
shape against the shapes the model wants and naming every missing, unused or mis-shaped
tensor in one ValueError. Given the `Checkpoint` the tensors were read from
(`hf_directory.read_checkpoint`), the error also names its directory and, for each missing
tensor, the file it was expected in.

Rules are written for blocks named `{transformer}/block_{i}`. Transformers built with
`scan=True` hold them stacked on a leading layer axis as `{transformer}/blocks`; both
directions take the list of such `stacked` transformer paths and (un)stack in between.
"""

import dataclasses
import os
import re
from typing import Callable, Mapping

import numpy as np


def option(kwargs: dict, module, name: str):
  """`kwargs[name]`, else the default of field `name` of the flax module class `module`: the
  value a `module(**kwargs)` would use."""
  if name in kwargs:
    return kwargs[name]
  return {field.name: field.default for field in dataclasses.fields(module)}[name]


def to_numpy(x) -> np.ndarray:
  """A torch tensor (any dtype, bfloat16 included, which numpy lacks) or array -> float32."""
  if hasattr(x, 'detach'):
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, np.float32)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Where a state dict was read from, for error messages.

  `directory`: a `save_pretrained` directory. `files`: each HF key's file, as a sharded
  checkpoint's `index` lists them; a key not there is expected in `default_file` (a
  one-file checkpoint's `model.safetensors`), or, None, is not in the index.
  """
  directory: str
  files: Mapping[str, str] = dataclasses.field(default_factory=dict)
  default_file: str | None = None
  index: str | None = None

  def where(self, key: str) -> str:
    """Where `key` should be, as ' (expected in FILE)' or ' (not in INDEX)'."""
    if key in self.files:
      return f' (expected in {os.path.join(self.directory, self.files[key])}, per {self.index})'
    if self.default_file is not None:
      return f' (expected in {os.path.join(self.directory, self.default_file)})'
    return f' (not in {os.path.join(self.directory, self.index or "")})'


def _missing(key: str, checkpoint: Checkpoint | None) -> str:
  return f'HF key missing: {key}' + ('' if checkpoint is None else checkpoint.where(key))


def _weights(checkpoint: Checkpoint | None) -> str:
  return 'HF weights' + ('' if checkpoint is None else f' in {checkpoint.directory}')


def check_present(arrays, keys, checkpoint: Checkpoint | None = None, why: str = ''):
  """Raises ValueError naming each of `keys` that `arrays` lacks (and where it was expected,
  from `checkpoint`), for a loader that reads tensors before `to_ours`; `why` says what
  needs them."""
  missing = [_missing(key, checkpoint) for key in keys if key not in arrays]
  _raise(missing, f'{_weights(checkpoint)} do not fit the model{why}')


@dataclasses.dataclass(frozen=True)
class Rule:
  """HF tensor `hf_key` <-> our params `paths` (blocks unstacked).

  `to_ours(hf_array)` returns a tuple of `len(paths)` arrays, `to_hf(*our_arrays)` the
  HF array; both only move, split or join elements, so a round trip is exact.
  """
  hf_key: str
  paths: tuple[str, ...]
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]


def _identity(x):
  return x


def _transpose(x):
  return x.T


def one(hf_key: str, path: str, to_ours=_identity, to_hf=_identity) -> Rule:
  """A rule between one HF tensor and one param; `to_ours`/`to_hf` map a single array."""
  return Rule(hf_key, (path,), lambda x: (to_ours(x),), to_hf)


def reshaped(hf_key: str, path: str, hf_shape: tuple[int, ...], shape: tuple[int, ...]) -> Rule:
  """The same elements in another shape: HF `hf_shape` <-> our `shape` (each may hold a -1)."""
  return one(hf_key, path, lambda x: x.reshape(shape), lambda x: x.reshape(hf_shape))


def layer_norm(hf_prefix: str, path: str) -> list[Rule]:
  """torch `nn.LayerNorm` `weight`, `bias` <-> flax `LayerNorm` `scale`, `bias`."""
  return [one(f'{hf_prefix}.weight', f'{path}/scale'), one(f'{hf_prefix}.bias', f'{path}/bias')]


def linear(hf_prefix: str, path: str, bias: bool = True) -> list[Rule]:
  """torch `nn.Linear` `weight [out, in]`, `bias` <-> `layers.Dense` `kernel [in, out]`, `bias`."""
  rules = [one(f'{hf_prefix}.weight', f'{path}/kernel', _transpose, _transpose)]
  if bias:
    rules.append(one(f'{hf_prefix}.bias', f'{path}/bias'))
  return rules


def conv(hf_prefix: str, path: str, bias: bool) -> list[Rule]:
  """torch `nn.Conv2d` `weight [out, in, h, w]`, `bias` <-> flax `Conv` `kernel [h, w, in, out]`."""
  rules = [one(f'{hf_prefix}.weight', f'{path}/kernel',
               lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))]
  if bias:
    rules.append(one(f'{hf_prefix}.bias', f'{path}/bias'))
  return rules


def _split_heads(num_heads):
  """HF `[heads * head_dim, width]` weight -> our `[width, heads, head_dim]` kernel."""
  return lambda w: w.T.reshape(w.shape[1], num_heads, -1)


def _merge_heads(kernel):
  return kernel.reshape(kernel.shape[0], -1).T


def attention(hf_prefix: str, path: str, num_heads: int, packed: bool = False) -> list[Rule]:
  """HF attention <-> `layers.Attention` (`query`, `key`, `value`, `out`).

  `packed=False`: HF `q_proj`, `k_proj`, `v_proj`, `out_proj` Linears (CLIP, SigLIP
  encoders). `packed=True`: torch `nn.MultiheadAttention`, whose `in_proj_weight
  [3 * width, width]` and `in_proj_bias [3 * width]` stack q, k, v in that order.
  """
  names = ('query', 'key', 'value')
  split_bias = lambda b: b.reshape(num_heads, -1)
  merge_bias = lambda b: b.reshape(-1)
  if packed:
    rules = [
        Rule(f'{hf_prefix}.in_proj_weight', tuple(f'{path}/{n}/kernel' for n in names),
             lambda w: tuple(map(_split_heads(num_heads), np.split(w, 3))),
             lambda *kernels: np.concatenate([_merge_heads(k) for k in kernels])),
        Rule(f'{hf_prefix}.in_proj_bias', tuple(f'{path}/{n}/bias' for n in names),
             lambda b: tuple(map(split_bias, np.split(b, 3))),
             lambda *biases: np.concatenate([merge_bias(b) for b in biases])),
    ]
  else:
    rules = []
    for hf_name, name in zip(('q_proj', 'k_proj', 'v_proj'), names):
      rules += [one(f'{hf_prefix}.{hf_name}.weight', f'{path}/{name}/kernel',
                    _split_heads(num_heads), _merge_heads),
                one(f'{hf_prefix}.{hf_name}.bias', f'{path}/{name}/bias', split_bias, merge_bias)]
  return rules + [
      one(f'{hf_prefix}.out_proj.weight', f'{path}/out/kernel',  # [width, heads * head_dim]
          lambda w: w.T.reshape(num_heads, -1, w.shape[0]),
          lambda k: k.reshape(-1, k.shape[-1]).T),
      one(f'{hf_prefix}.out_proj.bias', f'{path}/out/bias'),
  ]


_BLOCK = re.compile(r'^(?P<transformer>.*)/block_(?P<layer>\d+)/(?P<rest>.*)$')


def _display(path, stacked):
  """A path as the user's params name it: `.../blocks/... [layer i]` when stacked."""
  match = _BLOCK.match(path)
  if match and match['transformer'] in stacked:
    return f"{match['transformer']}/blocks/{match['rest']} [layer {match['layer']}]"
  return path


def _stack(flat, stacked):
  out, layers = {}, {}
  for path, value in flat.items():
    match = _BLOCK.match(path)
    if match and match['transformer'] in stacked:
      key = f"{match['transformer']}/blocks/{match['rest']}"
      layers.setdefault(key, []).append((int(match['layer']), value))
    else:
      out[path] = value
  for key, values in layers.items():
    out[key] = np.stack([value for _, value in sorted(values, key=lambda lv: lv[0])])
  return out


def _unstack(flat, stacked):
  out, problems = {}, []
  for path, value in flat.items():
    transformer, sep, rest = path.partition('/blocks/')
    if not (sep and transformer in stacked):
      out[path] = value
    elif value.ndim == 0:
      problems.append(f'param {path} has no leading layer axis')
    else:
      out.update({f'{transformer}/block_{i}/{rest}': layer for i, layer in enumerate(value)})
  return out, problems


def _raise(problems, what):
  if problems:
    raise ValueError(f'{what}:\n  ' + '\n  '.join(problems))


def _unmatched(rules, expected, stacked):
  """Params the model has but no rule fills, and rule params the model lacks."""
  covered = {path for rule in rules for path in rule.paths}
  return ([f'param has no HF key: {_display(path, stacked)}'
           for path in sorted(expected) if path not in covered] +
          [f'HF key {rule.hf_key} maps to {_display(path, stacked)}, which the model lacks'
           for rule in rules for path in rule.paths if path not in expected])


def to_ours(arrays: dict[str, np.ndarray], rules: list[Rule], expected: dict[str, tuple],
            stacked=(), ignore: Callable[[str], bool] = lambda key: False,
            checkpoint: Checkpoint | None = None) -> dict[str, np.ndarray]:
  """HF `arrays` -> our params as a flat `{'/'-joined path: array}` dict, blocks of `stacked`
  transformers stacked.

  `expected` maps every param path (blocks unstacked) to the shape the model wants. HF
  keys for which `ignore(key)` holds may go unused. `checkpoint`, if the arrays were read
  from one, is named in the error. Raises ValueError naming every HF key missing (and the
  file it was expected in), unused or of the wrong shape, and every param that no rule
  fills or that the model lacks.
  """
  problems, flat = [], {}
  for rule in rules:
    if rule.hf_key not in arrays:
      problems.append(_missing(rule.hf_key, checkpoint))
      continue
    array = arrays[rule.hf_key]
    try:
      values = rule.to_ours(array)
    except ValueError as error:
      problems.append(f'HF key {rule.hf_key} of shape {array.shape} does not fit '
                      f'{", ".join(rule.paths)}: {error}')
      continue
    for path, value in zip(rule.paths, values):
      if path in expected and value.shape != tuple(expected[path]):
        problems.append(f'HF key {rule.hf_key} has shape {array.shape}, which gives '
                        f'{_display(path, stacked)} shape {value.shape}; the model wants '
                        f'{tuple(expected[path])}')
      flat[path] = value
  used = {rule.hf_key for rule in rules}
  problems += [f'HF key not used: {key}' for key in sorted(arrays)
               if key not in used and not ignore(key)]
  problems += _unmatched(rules, expected, stacked)
  _raise(problems, f'{_weights(checkpoint)} do not fit the model')
  return _stack(flat, stacked)


def to_hf(flat: dict[str, np.ndarray], rules: list[Rule], expected: dict[str, tuple],
          stacked=()) -> dict[str, np.ndarray]:
  """Our params as a flat `{'/'-joined path: array}` dict (blocks of `stacked` transformers
  stacked) -> `{hf_key: array}`.

  Raises ValueError naming every param missing, unknown or of the wrong shape (with the
  HF key it would become), checked against `expected` as in `to_ours`.
  """
  flat, problems = _unstack(flat, stacked)
  hf_key_of = {path: f' (HF key {rule.hf_key})' for rule in rules for path in rule.paths}
  for path in sorted(set(expected) | set(flat)):
    name = _display(path, stacked) + hf_key_of.get(path, '')
    if path not in flat:
      problems.append(f'param missing: {name}')
    elif path not in expected:
      problems.append(f'param not in the model: {name}')
    elif flat[path].shape != tuple(expected[path]):
      problems.append(f'param {name} has shape {flat[path].shape}; the model wants '
                      f'{tuple(expected[path])}')
  problems += _unmatched(rules, expected, stacked)
  _raise(problems, 'params do not fit the model')
  return {rule.hf_key: np.asarray(rule.to_hf(*(flat[path] for path in rule.paths)),
                                  order='C')
          for rule in rules}
