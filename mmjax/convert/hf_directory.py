"""Read a local Hugging Face `save_pretrained` directory of a CLIPModel or SiglipModel.

    config, params = load_hf_directory('/path/to/siglip', scan=True)
    CLIP(**config).apply({'params': params}, images_nhwc, token_ids)

Reads `config.json` with `transformers.AutoConfig` (for its defaults; files only, never
the hub) and the weights with the safetensors numpy API, from `model.safetensors` or the
shards listed in `model.safetensors.index.json` (`read_checkpoint`, which any family's
`params_from_hf` can take with its `weight_map.Checkpoint`, so that a missing tensor is
named with the file it was expected in). Only safetensors are read: a directory of
`pytorch_model.bin` weights is refused with the way to convert it. Needs `transformers`
and `safetensors`.
"""

import json
import os

import ml_dtypes  # noqa: F401  (lets numpy, and so safetensors, read bfloat16)
import numpy as np

from mmjax.convert import hf_clip
from mmjax.convert import hf_siglip
from mmjax.convert import weight_map

FAMILIES = {'clip': hf_clip, 'siglip': hf_siglip}  # HF `model_type` -> converter
SAFETENSORS = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
TORCH_FILES = ('pytorch_model.bin', 'pytorch_model.bin.index.json')


def _no_safetensors(path: str) -> FileNotFoundError:
  """The error for a directory with neither `model.safetensors` nor its index."""
  present = sorted(os.listdir(path))
  torch_files = [name for name in present if name in TORCH_FILES]
  if torch_files:
    return FileNotFoundError(
        f'{path} holds {torch_files[0]} but no {SAFETENSORS}: only safetensors weights are '
        f'read. Convert the directory once with transformers, e.g. '
        f'`transformers.AutoModel.from_pretrained(dir).save_pretrained(dir, '
        f'safe_serialization=True)` (the model class of its config.json)')
  return FileNotFoundError(f'{path} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX} '
                           f'(it holds {present})')


def _index(path: str) -> dict[str, str]:
  """`{HF key: shard file}` from the directory's `model.safetensors.index.json`."""
  index = os.path.join(path, SAFETENSORS_INDEX)
  try:
    with open(index) as f:
      files = json.load(f)['weight_map']
  except (json.JSONDecodeError, KeyError, TypeError) as error:
    raise ValueError(f'{index} is not a safetensors index (a JSON object with a '
                     f'"weight_map" of tensor names to shard files): {error!r}') from error
  missing = sorted(set(files.values()) - set(os.listdir(path)))
  if missing:
    keys = [key for key, name in files.items() if name == missing[0]]
    raise FileNotFoundError(f'{index} lists shard files missing from {path}: {missing} '
                            f'({len(keys)} tensors expected in {missing[0]}, e.g. {keys[0]})')
  return files


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], weight_map.Checkpoint]:
  """`({HF key: array}, where they came from)` of a `save_pretrained` directory.

  Arrays are as stored (e.g. float32 or bfloat16). Raises FileNotFoundError naming the
  directory and the file it lacks (`model.safetensors`, a shard the index lists; with
  `pytorch_model.bin` weights only, how to convert them), ValueError naming a file that is
  not safetensors.
  """
  import safetensors
  import safetensors.numpy

  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such directory (a save_pretrained directory)')
  if os.path.exists(os.path.join(path, SAFETENSORS_INDEX)):
    files = _index(path)
    checkpoint = weight_map.Checkpoint(path, files, index=SAFETENSORS_INDEX)
  elif os.path.exists(os.path.join(path, SAFETENSORS)):
    files = {}
    checkpoint = weight_map.Checkpoint(path, default_file=SAFETENSORS)
  else:
    raise _no_safetensors(path)
  arrays = {}
  for name in sorted(set(files.values())) or [SAFETENSORS]:
    file = os.path.join(path, name)
    try:
      arrays.update(safetensors.numpy.load_file(file))
    except safetensors.SafetensorError as error:
      raise ValueError(f'{file} is not a readable safetensors file: {error}') from error
  return arrays, checkpoint


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """`{HF key: array}` (as stored, e.g. float32 or bfloat16) from a `save_pretrained` dir
  (`read_checkpoint` without where they came from)."""
  return read_checkpoint(path)[0]


def load_hf_directory(path: str, *, scan: bool = True) -> tuple[dict, dict]:
  """A `save_pretrained` directory -> (`CLIP(...)` kwargs, float32 numpy params).

  The family comes from `model_type` in `config.json`: 'clip' or 'siglip'. Raises
  FileNotFoundError naming the directory and the file it lacks (`config.json`, the weights:
  `read_checkpoint`), ValueError naming an unsupported family or, with the directory and
  the file each was expected in, every tensor missing, unused or mis-shaped.
  """
  import transformers

  if not os.path.isfile(os.path.join(path, 'config.json')):
    raise FileNotFoundError(f'{path}: no config.json (not a save_pretrained directory, or '
                            'no such directory)')
  hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
  if hf_config.model_type not in FAMILIES:
    raise ValueError(f'{path}: model_type {hf_config.model_type!r} is not one of '
                     f'{sorted(FAMILIES)}')
  family = FAMILIES[hf_config.model_type]
  config = family.config_from_hf(hf_config, scan=scan)
  arrays, checkpoint = read_checkpoint(path)
  return config, family.params_from_hf(arrays, config, checkpoint=checkpoint)
