"""Config checks shared by the tasks whose decoder LM reads byte-level rows with images."""

from mmjax.data.tokenizers import ByteLMTokenizer


def check_language_model(config) -> None:
  """Raises ValueError naming the key when `config.model.language_model` cannot read
  `ByteLMTokenizer` ids or its heads do not group."""
  lm = config.model.language_model
  if lm.vocab_size < ByteLMTokenizer.vocab_size:
    raise ValueError(f'config.model.language_model.vocab_size={lm.vocab_size} is smaller '
                     f'than the tokenizer vocabulary ({ByteLMTokenizer.vocab_size})')
  if lm.num_heads % lm.num_kv_heads:
    raise ValueError(f'config.model.language_model.num_heads={lm.num_heads} is not a '
                     f'multiple of num_kv_heads={lm.num_kv_heads}')


def check_image_size(config) -> None:
  """Raises ValueError when `config.data.image_size` is not a multiple of the vision tower's
  `config.model.vision.patch_size`."""
  size, patch = config.data.image_size, config.model.vision.patch_size
  if size % patch:
    raise ValueError(f'config.data.image_size={size} is not divisible by '
                     f'config.model.vision.patch_size={patch}')
