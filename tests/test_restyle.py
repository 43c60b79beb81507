"""Drawing-style augmentation (`config.data.restyle_prob`, `mmjax.data.images.restyle`): each
restyle draws what it says and the draw happens at the configured rate (its config key:
tests/test_config_validation.py)."""

import numpy as np
import pytest
from PIL import Image

from mmjax.data import images


def _red_square_on_white(size=32):
  image = np.full((size, size, 3), 255, np.uint8)
  image[8:24, 8:24] = (200, 30, 30)
  return Image.fromarray(image)


def test_outline_draws_dark_edges_on_white():
  out = np.asarray(images.restyle(_red_square_on_white(), 'outline'))
  assert out.shape == (32, 32, 3)
  assert set(np.unique(out)) == {0, 255}  # line art: black lines, white paper
  dark = out[..., 0] == 0
  assert dark[7, 7:25].all() and dark[24, 7:25].all()  # a line round the square
  assert dark[7:25, 7].all() and dark[7:25, 24].all()
  assert not dark[12:20, 12:20].any()  # its flat inside
  assert not dark[:6].any() and not dark[:, :6].any()  # the paper, image border included
  blank = np.asarray(images.restyle(Image.new('RGB', (32, 32), 'white'), 'outline'))
  assert (blank == 255).all()


def test_gray_and_flat_restyles():
  gray = np.asarray(images.restyle(_red_square_on_white(), 'gray')).astype(int)
  assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
  assert gray[16, 16, 0] < 255 and gray[0, 0, 0] == 255
  flat = np.asarray(images.restyle(_red_square_on_white(), 'flat'))
  assert set(np.unique(flat)) <= set(range(0, 256, 32))  # 3 bits a channel
  with pytest.raises(ValueError, match="unknown restyle 'sketch'"):
    images.restyle(_red_square_on_white(), 'sketch')


def test_restyle_rate_and_off_draws_nothing():
  rng = np.random.default_rng(0)
  kinds = [images.random_jitter(rng, 0.3)['restyle'] for _ in range(3000)]
  share = np.mean([kind is not None for kind in kinds])
  assert 0.27 < share < 0.33
  assert {kind for kind in kinds if kind} == set(images.RESTYLES)
  # Off, the jitter draws the same numbers as before the option existed: streams of
  # configs without it stay as they were.
  a, b = np.random.default_rng(1), np.random.default_rng(1)
  for _ in range(10):
    jitter = images.random_jitter(a, 0.0)
    assert jitter['restyle'] is None
  for _ in range(10):
    b.uniform(0.7, 1.3, 3)
    if b.uniform() < 0.5:
      b.uniform(0, 1.5)
  assert a.uniform() == b.uniform()
