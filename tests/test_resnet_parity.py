"""CLIP's ResNet image tower (`mmjax.models.resnet.ModifiedResNet`) against open_clip's, and
its place in CLIP (`config.model.image.kind='resnet'`).

The reference is open_clip's `modified_resnet.py`, loaded by file path so that the
`open_clip` package `__init__` (timm, ...) is not imported. Its one relative import,
`from .utils import freeze_batch_norm_2d, feature_take_indices` (utils.py imports
torchvision, which is not installed), is served by a stub package whose two functions
raise: neither is on the forward path (`lock(freeze_bn_stats=True)` and
`forward_intermediates`). The parity tests (marker `parity`) build a tiny random model,
randomise every weight and BatchNorm running statistic (open_clip zero-initialises each
block's last BatchNorm scale, which would hide the residual branches), import its state
dict with `mmjax.convert.open_clip_resnet` and compare in eval() and in train() mode.
"""

import importlib.util
import os
import sys
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config_lib
from mmjax import tasks
from mmjax.convert import open_clip_resnet
from mmjax.models import resnet
from mmjax.models.clip import CLIP
from mmjax.tasks import clip as clip_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny, but with every kind of block: stage 1's channel-changing shortcut, stride-2 stages, a
# second block without shortcut (stages 1 and 4), and a 2x2 final map (5 pool tokens).
CONFIG = dict(layers=(2, 1, 1, 2), width=8, heads=2, output_dim=16, image_size=64)


@pytest.fixture(scope='module')
def reference():
  pytest.importorskip('torch')
  if importlib.util.find_spec('open_clip') is None:
    pytest.skip('open_clip is not installed')
  return load_reference()


def load_reference():
  """open_clip's `modified_resnet` module, loaded by file path with `.utils` stubbed."""
  spec = importlib.util.find_spec('open_clip')
  package_name = '_open_clip_reference'

  def unused(*args, **kwargs):
    raise NotImplementedError('not on the forward path; stubbed by tests/test_resnet_parity.py')

  package = types.ModuleType(package_name)
  package.__path__ = []  # a package, so that `from .utils import ...` resolves in sys.modules
  utils = types.ModuleType(f'{package_name}.utils')
  utils.freeze_batch_norm_2d = utils.feature_take_indices = unused
  path = os.path.join(spec.submodule_search_locations[0], 'modified_resnet.py')
  module_spec = importlib.util.spec_from_file_location(f'{package_name}.modified_resnet', path)
  module = importlib.util.module_from_spec(module_spec)
  saved = {name: sys.modules.get(name) for name in (package_name, utils.__name__)}
  sys.modules.update({package_name: package, utils.__name__: utils})
  try:
    module_spec.loader.exec_module(module)
  finally:
    for name, previous in saved.items():
      if previous is None:
        sys.modules.pop(name)
      else:
        sys.modules[name] = previous
  return module


def torch_model(reference, seed=0, **overrides):
  """open_clip's `ModifiedResNet(**CONFIG)` with every weight and BatchNorm statistic random."""
  import torch  # pylint: disable=g-import-not-at-top
  config = dict(CONFIG, **overrides)
  torch.manual_seed(seed)
  model = reference.ModifiedResNet(layers=list(config['layers']),
                                   output_dim=config['output_dim'], heads=config['heads'],
                                   image_size=config['image_size'], width=config['width'])
  with torch.no_grad():
    for name, param in model.named_parameters():
      if param.ndim == 4:  # conv kernels, ~unit-variance outputs
        param.normal_(0, param[0].numel() ** -0.5)
      elif name.endswith(('bn1.weight', 'bn2.weight', 'bn3.weight', 'downsample.1.weight')):
        param.uniform_(0.5, 1.5)
      else:
        param.normal_(0, 0.2 if param.ndim == 1 else param.shape[-1] ** -0.5)
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0, 0.5)
        module.running_var.uniform_(0.5, 2.0)
  return model


def images_nchw(batch=3, size=64, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


def torch_forward(model, images):
  """open_clip's (pooled, last feature map as [b, h*w, c]) for NCHW numpy `images`."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    x = torch.from_numpy(images)
    features = model.layer4(model.layer3(model.layer2(model.layer1(model.stem(x)))))
    pooled = model.attnpool(features)
  tokens = features.permute(0, 2, 3, 1).reshape(features.shape[0], -1, features.shape[1])
  return pooled.numpy(), tokens.numpy()


def ours(params, images, *, train=False, **overrides):
  """Our (pooled, tokens[, batch_stats]) for NCHW numpy `images`."""
  model = resnet.ModifiedResNet(**dict(CONFIG, **overrides))
  nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
  if train:
    return jax.jit(lambda p: model.apply({'params': p}, nhwc, train=True,
                                         mutable=['batch_stats']))(params)
  return jax.jit(lambda p: model.apply({'params': p}, nhwc))(params)


@pytest.mark.parity
def test_eval_mode_matches_open_clip(reference):
  """BatchNorm with (random) running statistics, as torch's eval()."""
  model = torch_model(reference).eval()
  images = images_nchw()
  want_pooled, want_tokens = torch_forward(model, images)
  params = open_clip_resnet.params_from_open_clip(model.state_dict(), CONFIG)
  pooled, tokens = ours(params, images)
  assert pooled.shape == (3, CONFIG['output_dim']) and tokens.shape == (3, 4, 32 * 8)
  assert np.abs(want_pooled).max() > 0.1  # not a vanishing signal
  np.testing.assert_allclose(pooled, want_pooled, rtol=0, atol=1e-5)
  np.testing.assert_allclose(tokens, want_tokens, rtol=0, atol=1e-5)


@pytest.mark.parity
def test_train_mode_matches_open_clip(reference):
  """torch's train(): batch moments normalise, and the running statistics move by momentum
  0.1 towards the batch mean and unbiased variance, as `update_batch_stats` moves ours."""
  model = torch_model(reference, seed=2)
  params = open_clip_resnet.params_from_open_clip(model.state_dict(), CONFIG)
  images = images_nchw(batch=4, seed=3)
  model.train()
  want_pooled, want_tokens = torch_forward(model, images)
  (pooled, tokens), state = ours(params, images, train=True)
  # Outputs up to ~7; measured errors 1e-5 (pooled) and 2e-5 (tokens): float32 rounding of
  # batch moments (16 values per channel at the last stage) renormalised stage after stage.
  np.testing.assert_allclose(pooled, want_pooled, rtol=0, atol=3e-5)
  np.testing.assert_allclose(tokens, want_tokens, rtol=0, atol=3e-5)
  updated = resnet.update_batch_stats(params, state['batch_stats'], momentum=0.1)
  want = open_clip_resnet.params_from_open_clip(model.state_dict(), CONFIG)
  flat = flax.traverse_util.flatten_dict(updated, sep='/')
  for path, value in flax.traverse_util.flatten_dict(want, sep='/').items():
    np.testing.assert_allclose(flat[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
  assert not np.allclose(flat['norm1/mean'], params['norm1']['mean'])  # they did move


@pytest.mark.parity
def test_export_is_exact_and_import_names_problems(reference):
  state_dict = {key: value.numpy() for key, value in torch_model(reference).state_dict().items()}
  params = open_clip_resnet.params_from_open_clip(state_dict, CONFIG)
  exported = open_clip_resnet.params_to_open_clip(params, CONFIG)
  assert set(exported) == {key for key in state_dict if not key.endswith('num_batches_tracked')}
  for key, value in exported.items():
    np.testing.assert_array_equal(value, state_dict[key], err_msg=key)
  # A whole open_clip CLIP's state dict: the tower under `visual.`, other keys ignored.
  whole = {**{f'visual.{key}': value for key, value in state_dict.items()},
           'text_projection': np.zeros((4, 4), np.float32)}
  jax.tree.map(np.testing.assert_array_equal,
               open_clip_resnet.params_from_open_clip(whole, CONFIG, prefix='visual.'), params)
  broken = {key: value for key, value in state_dict.items() if key != 'layer2.0.bn2.running_var'}
  broken['attnpool.c_proj.bias'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r'(?s)missing: layer2\.0\.bn2\.running_var.*'
                                       r'attnpool\.c_proj\.bias has shape \(3,\)'):
    open_clip_resnet.params_from_open_clip(broken, CONFIG)
  with pytest.raises(ValueError, match="uses BatchNorm; got norm='group'"):
    open_clip_resnet.params_from_open_clip(state_dict, dict(CONFIG, norm='group'))


def test_shapes_norms_and_errors():
  """Shapes of both norms, no `mean`/`var` params or batch stats with GroupNorm, the zero
  scale of each block's last norm, and the errors of a bad image size or norm."""
  images = jnp.zeros((2, 64, 64, 3))
  for norm, param_names in (('batch', {'scale', 'bias', 'mean', 'var'}),
                            ('group', {'scale', 'bias'})):
    model = resnet.ModifiedResNet(**CONFIG, norm=norm, norm_groups=2)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    params = flax.linen.unbox(variables['params'])
    assert set(params['layer3_0']['norm2']) == param_names
    (pooled, tokens), state = jax.eval_shape(
        lambda v: model.apply(v, images, train=True, mutable=['batch_stats']), variables)
    assert pooled.shape == (2, 16) and tokens.shape == (2, 4, 256)
    assert bool(state) == (norm == 'batch')
  params = flax.linen.unbox(resnet.ModifiedResNet(**CONFIG).init(jax.random.key(0), images))
  assert not np.any(params['params']['layer1_1']['norm3']['scale'])
  with pytest.raises(ValueError, match=r'images of shape \(32, 32, 3\); the ResNet takes '
                                       r'\(64, 64, 3\)'):
    resnet.ModifiedResNet(**CONFIG).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"norm must be one of \('batch', 'group'\), got 'layer'"):
    resnet.ModifiedResNet(**CONFIG, norm='layer').init(jax.random.key(0), images)


def _config(**overrides):
  """configs/clip.py:tiny with the ResNet image tower on 32 px images (no data is built)."""
  return config_lib.load(os.path.join(REPO, 'configs', 'clip.py') + ':tiny', {
      'data.data_dir': '/nonexistent', 'data.image_size': 32, 'model.image.kind': 'resnet',
      'model.image_projection': 'none', **overrides})


def test_clip_with_resnet_image_tower_trains_its_batch_norm():
  """`ClipTask` with kind='resnet': `encode_image` gives unit vectors; the loss normalises
  with batch moments and returns them; `update_params` moves the running statistics (not
  those `config.trainable` freezes); no gradient reaches them."""
  config = _config()
  tasks.validate_config(config, 8)
  task = clip_task.ClipTask(config)
  params = flax.linen.unbox(task.init(jax.random.key(0)))
  assert set(params['image_tower']) >= {'conv1', 'layer4_0', 'attnpool'}
  assert 'image_projection' not in params
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  embeddings = jax.jit(task.encode_image)(params, images)
  assert embeddings.shape == (4, config.model.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)

  batch = {'image': images, 'text': jnp.asarray(rng.integers(1, 200, (4, 48)), jnp.int32)}
  (loss, aux), grads = jax.jit(jax.value_and_grad(task.loss, has_aux=True))(
      params, batch, jax.random.key(1))
  assert np.isfinite(loss) and set(aux) == {'logit_scale', 'batch_stats'}
  stats = aux['batch_stats']['image_tower']['layer2_0']['norm1']
  assert not np.any(grads['image_tower']['layer2_0']['norm1']['mean'])
  assert not np.any(grads['image_tower']['layer2_0']['norm1']['var'])
  assert np.any(grads['image_tower']['layer2_0']['norm3']['scale'])

  trainable = jax.tree.map(lambda _: True, params)
  updated, metrics = task.update_params(params, aux, trainable)
  assert set(metrics) == {'logit_scale'}
  np.testing.assert_allclose(updated['image_tower']['layer2_0']['norm1']['mean'],
                             0.1 * stats['mean'], rtol=1e-6, atol=1e-7)  # from 0
  np.testing.assert_allclose(updated['image_tower']['layer2_0']['norm1']['var'],
                             0.9 + 0.1 * stats['var'], rtol=1e-6)
  assert updated['image_tower']['conv1'] is params['image_tower']['conv1']
  frozen = dict(trainable, image_tower=jax.tree.map(lambda _: False, params['image_tower']))
  kept, _ = task.update_params(params, aux, frozen)
  jax.tree.map(np.testing.assert_array_equal, kept, params)


def test_clip_with_group_norm_resnet_has_no_batch_stats():
  task = clip_task.ClipTask(_config(**{'model.image.resnet_norm': 'group'}))
  params = flax.linen.unbox(task.init(jax.random.key(0)))
  batch = {'image': jnp.zeros((2, 32, 32, 3)), 'text': jnp.ones((2, 48), jnp.int32)}
  _, aux = jax.jit(task.loss)(params, batch, jax.random.key(1))
  assert set(aux) == {'logit_scale'}


@pytest.mark.parametrize('overrides, message', [
    ({'model.image.kind': 'resnset'},
     r"config\.model\.image\.kind='resnset'; use one of \('vit', 'resnet'\)"),
    ({'data.image_size': 48}, r'config\.data\.image_size=48 is not a multiple of 32'),
    ({'model.image.resnet_layers': (1, 1, 1)}, r'config\.model\.image\.resnet_layers='),
    ({'model.image.resnet_width': 15}, r'config\.model\.image\.resnet_width=15 must be even'),
    ({'model.image.resnet_heads': 3}, r'config\.model\.image\.resnet_heads=3 must divide'),
    ({'model.image.resnet_norm': 'layer'}, r"config\.model\.image\.resnet_norm='layer'"),
    ({'model.image.resnet_norm': 'group', 'model.image.resnet_norm_groups': 3},
     r'config\.model\.image\.resnet_norm_groups=3 must divide'),
    ({'model.image.resnet_batch_norm_momentum': 0.0},
     r'config\.model\.image\.resnet_batch_norm_momentum=0\.0 must be in'),
])
def test_resnet_config_errors_name_the_key(overrides, message):
  with pytest.raises(ValueError, match=message):
    tasks.validate_config(_config(**overrides), 8)


def test_clip_module_refuses_an_unknown_image_kind():
  text = dict(vocab_size=16, context_length=4, width=8, depth=1, num_heads=2)
  model = CLIP(image=dict(kind='convnext'), text=text, embed_dim=8)
  with pytest.raises(ValueError, match=r"image kind must be one of \('vit', 'resnet'\), got "
                                       r"'convnext'"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4), jnp.int32))


def test_vit_configs_keep_their_image_tower():
  """kind='vit' (the default) gives the ViT the unprefixed keys only."""
  config = config_lib.load(os.path.join(REPO, 'configs', 'siglip.py') + ':tiny',
                           {'data.data_dir': '/nonexistent'})
  image = clip_task.image_tower_kwargs(config)
  assert image['kind'] == 'vit' and image['pool'] == 'map'
  assert not any(key.startswith('resnet_') for key in image)
