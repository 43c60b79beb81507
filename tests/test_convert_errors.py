"""Hugging Face loaders on bad checkpoints: every error names the directory, the file and the
tensor. Tiny checkpoints are written with `safetensors.numpy` from our own export
(`hf_clip.params_to_hf`) and `transformers` configs: no torch."""

import json
import os
import re

os.environ['HF_HUB_OFFLINE'] = '1'

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402
import transformers  # noqa: E402

from mmjax.convert import hf_clip  # noqa: E402
from mmjax.convert import hf_directory  # noqa: E402
from mmjax.convert import hf_llava  # noqa: E402
from mmjax.convert import weight_map  # noqa: E402
from mmjax.models.clip import CLIP  # noqa: E402

TOWER = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
HF_CONFIG = transformers.CLIPConfig(
    vision_config=dict(image_size=8, patch_size=4, **TOWER),
    text_config=dict(vocab_size=32, max_position_embeddings=8, **TOWER), projection_dim=8)
SHARDS = ('model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors')
FINAL_NORM = 'text_model.final_layer_norm.bias'  # a tensor to remove


def _state_dict():
  """A CLIPModel state dict of `HF_CONFIG` as numpy: our random params, exported."""
  config = hf_clip.config_from_hf(HF_CONFIG, scan=False)
  shapes = jax.eval_shape(CLIP(**config).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, 8), jnp.int32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(np.float32),
                        nn.unbox(shapes)['params'])
  return hf_clip.params_to_hf(params, config)


def _save(directory, state_dict, *, sharded=False, index_extra=()):
  """`save_pretrained`'s files: config.json and model.safetensors, or two shards and their
  index (which also lists `index_extra` keys, in the second shard)."""
  HF_CONFIG.save_pretrained(directory)
  if not sharded:
    safetensors.numpy.save_file(state_dict, os.path.join(directory, 'model.safetensors'))
    return
  keys = sorted(state_dict)
  halves = keys[:len(keys) // 2], keys[len(keys) // 2:]
  files = {}
  for name, half in zip(SHARDS, halves):
    safetensors.numpy.save_file({key: state_dict[key] for key in half},
                                os.path.join(directory, name))
    files.update({key: name for key in half})
  files.update({key: SHARDS[1] for key in index_extra})
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': files}, f)


def test_sharded_directory_loads_as_the_one_file_one(tmp_path):
  one, sharded = tmp_path / 'one', tmp_path / 'sharded'
  one.mkdir()
  sharded.mkdir()
  _save(one, _state_dict())
  _save(sharded, _state_dict(), sharded=True)
  want = hf_directory.load_hf_directory(str(one))
  got = hf_directory.load_hf_directory(str(sharded))
  assert got[0] == want[0]
  jax.tree.map(np.testing.assert_array_equal, got[1], want[1])


def test_missing_tensor_names_the_directory_and_its_file(tmp_path):
  state_dict = _state_dict()
  del state_dict[FINAL_NORM]
  _save(tmp_path, state_dict)
  with pytest.raises(ValueError) as error:
    hf_directory.load_hf_directory(str(tmp_path))
  message = str(error.value)
  assert f'HF weights in {tmp_path} do not fit the model' in message
  assert (f'HF key missing: {FINAL_NORM} (expected in '
          f'{tmp_path / "model.safetensors"})') in message


def test_missing_tensor_of_a_sharded_checkpoint_names_its_shard(tmp_path):
  """A key the index puts in a shard that lacks it, and a key the index does not list."""
  state_dict = _state_dict()
  position_ids = 'text_model.embeddings.position_embedding.weight'
  del state_dict[FINAL_NORM], state_dict[position_ids]
  _save(tmp_path, state_dict, sharded=True, index_extra=[FINAL_NORM])
  with pytest.raises(ValueError) as error:
    hf_directory.load_hf_directory(str(tmp_path))
  message = str(error.value)
  assert (f'HF key missing: {FINAL_NORM} (expected in {tmp_path / SHARDS[1]}, per '
          'model.safetensors.index.json)') in message
  assert (f'HF key missing: {position_ids} (not in '
          f'{tmp_path / "model.safetensors.index.json"})') in message


def test_missing_shard_names_the_directory_and_the_file(tmp_path):
  _save(tmp_path, _state_dict(), sharded=True)
  os.remove(tmp_path / SHARDS[1])
  with pytest.raises(FileNotFoundError, match=rf'model\.safetensors\.index\.json lists shard '
                     rf'files missing from {re.escape(str(tmp_path))}: \[\'{SHARDS[1]}\'\] '
                     rf'\(\d+ tensors expected in {SHARDS[1]}, e\.g\. '):
    hf_directory.load_hf_directory(str(tmp_path))


def test_pytorch_bin_only_says_to_convert(tmp_path):
  HF_CONFIG.save_pretrained(tmp_path)
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not read')
  with pytest.raises(FileNotFoundError) as error:
    hf_directory.load_hf_directory(str(tmp_path))
  message = str(error.value)
  assert f'{tmp_path} holds pytorch_model.bin but no model.safetensors' in message
  assert 'only safetensors weights are read' in message
  assert 'save_pretrained(dir, safe_serialization=True)' in message


def test_directory_without_weights_or_config(tmp_path):
  HF_CONFIG.save_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match=rf'{re.escape(str(tmp_path))} has neither '
                     r'model\.safetensors nor model\.safetensors\.index\.json \(it holds '
                     r'\[\'config\.json\'\]\)'):
    hf_directory.load_hf_directory(str(tmp_path))
  absent = re.escape(str(tmp_path / 'absent'))
  with pytest.raises(FileNotFoundError, match=rf'{absent}: no config\.json'):
    hf_directory.load_hf_directory(str(tmp_path / 'absent'))
  with pytest.raises(FileNotFoundError, match=rf'{absent}: no such directory'):
    hf_directory.read_checkpoint(str(tmp_path / 'absent'))


def test_unreadable_files_are_named(tmp_path):
  HF_CONFIG.save_pretrained(tmp_path)
  (tmp_path / 'model.safetensors').write_bytes(b'\x00' * 16)
  file = re.escape(str(tmp_path / 'model.safetensors'))
  with pytest.raises(ValueError, match=rf'{file} is not a readable safetensors file'):
    hf_directory.load_hf_directory(str(tmp_path))
  os.remove(tmp_path / 'model.safetensors')
  (tmp_path / 'model.safetensors.index.json').write_text('{"metadata": {}}')
  with pytest.raises(ValueError, match=r'model\.safetensors\.index\.json is not a safetensors '
                     r'index .*weight_map'):
    hf_directory.load_hf_directory(str(tmp_path))


def _llava_config(projector_act):
  vision = transformers.CLIPVisionConfig(image_size=8, patch_size=4, hidden_act='quick_gelu',
                                         **dict(TOWER, num_hidden_layers=2))
  text = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1)
  return hf_llava.config_from_hf(transformers.LlavaConfig(
      vision_config=vision, text_config=text, image_token_id=63,
      projector_hidden_act=projector_act, multimodal_projector_bias=True))


@pytest.mark.parametrize('projector_act', ['linear', 'gelu'])
def test_missing_llava_projector_tensor_is_named_with_its_file(projector_act):
  """The 'linear' projector reads linear_1 and linear_2 itself before the weight map (it
  composes them): a missing one was a bare KeyError."""
  projector = 'model.multi_modal_projector.'
  state_dict = {projector + 'linear_2.weight': np.zeros((16, 16), np.float32),
                projector + 'linear_2.bias': np.zeros(16, np.float32),
                projector + 'linear_1.bias': np.zeros(16, np.float32)}
  config = _llava_config(projector_act)
  with pytest.raises(ValueError, match=rf'(?m)HF key missing: {projector}linear_1\.weight$'):
    hf_llava.params_from_hf(state_dict, config)
  checkpoint = weight_map.Checkpoint('/ckpt/llava', default_file='model.safetensors')
  with pytest.raises(ValueError) as error:
    hf_llava.params_from_hf(state_dict, config, checkpoint=checkpoint)
  message = str(error.value)
  assert message.startswith('HF weights in /ckpt/llava do not fit the model')
  assert (f'HF key missing: {projector}linear_1.weight (expected in '
          '/ckpt/llava/model.safetensors)') in message
