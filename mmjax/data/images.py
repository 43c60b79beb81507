"""Images of a built dataset as a model reads them: float32 [S, S, 3] in [-1, 1], with the
training augmentation of each dataset (a random square crop, photometric jitter).

Every random draw comes from the `rng` passed in, so an example's augmentation is a function
of (seed, position in the stream) and iterators restore exactly.
"""

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

JITTERED = ('emoji', 'tuxpaint')  # Datasets whose training images get `random_jitter`.
# Range of the random crop's area fraction (None: no crop).
CROP_AREA = {'digits': None, 'emoji': (0.8, 1.0), 'tuxpaint': (0.8, 1.0)}
# Drawing-style changes of `random_jitter(restyle_prob > 0)`: 'outline' (dark edges on white,
# as line art), 'flat' (3 bits a channel: flat fills, no shading), 'gray' (luminance only).
RESTYLES = ('outline', 'flat', 'gray')


def restyle(pil: Image.Image, kind: str) -> Image.Image:
  """The RGB image `pil` redrawn in another style, `kind` one of `RESTYLES`."""
  if kind == 'outline':
    edges = pil.convert('L').filter(ImageFilter.FIND_EDGES)
    edges = ImageOps.expand(ImageOps.crop(edges, 1), 1, fill=0)  # the filter marks the border
    return ImageOps.invert(edges.point(lambda v: 255 if v > 40 else 0)).convert('RGB')
  if kind == 'flat':
    return ImageOps.posterize(pil, 3)
  if kind == 'gray':
    return ImageOps.grayscale(pil).convert('RGB')
  raise ValueError(f'unknown restyle {kind!r}; use one of {RESTYLES}')


def preprocess(image: np.ndarray, image_size: int, box=None, jitter=None) -> np.ndarray:
  """uint8 [h, w, 1 or 3] -> float32 [S, S, 3] in [-1, 1]; crops to `box` (x0, y0, x1, y1)
  and applies `jitter` (from `random_jitter`) before resizing."""
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert('RGB')
  if jitter and jitter.get('restyle'):
    pil = restyle(pil, jitter['restyle'])
  if jitter:
    pil = ImageEnhance.Brightness(pil).enhance(jitter['brightness'])
    pil = ImageEnhance.Contrast(pil).enhance(jitter['contrast'])
    pil = ImageEnhance.Color(pil).enhance(jitter['saturation'])
    if jitter['blur']:
      pil = pil.filter(ImageFilter.GaussianBlur(jitter['blur']))
  pil = pil.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
  return np.asarray(pil, np.float32) / 127.5 - 1


def random_jitter(rng: np.random.Generator, restyle_prob: float = 0.0) -> dict:
  """Photometric jitter that keeps hues (names say "red", "green"): brightness, contrast,
  saturation factors in [0.7, 1.3] and, half the time, a Gaussian blur of up to 1.5 source
  pixels, so a drawing style's sharp outlines or soft shading is not a shortcut. With
  `restyle_prob`, that share of images is first redrawn in one of `RESTYLES` (drawn
  uniformly); at 0 nothing more is drawn from `rng`, so the stream is as without it."""
  brightness, contrast, saturation = rng.uniform(0.7, 1.3, 3)
  blur = rng.uniform(0, 1.5) if rng.uniform() < 0.5 else 0.0
  kind = None
  if restyle_prob and rng.uniform() < restyle_prob:
    kind = RESTYLES[rng.integers(len(RESTYLES))]
  return dict(brightness=brightness, contrast=contrast, saturation=saturation, blur=blur,
              restyle=kind)


def random_box(size: int, area: tuple[float, float], rng: np.random.Generator):
  """A random square crop box covering a fraction in `area` of a [size, size] image."""
  side = size * np.sqrt(rng.uniform(*area))
  x0, y0 = rng.uniform(0, size - side, 2)
  return (x0, y0, x0 + side, y0 + side)


def prepare_image(image: np.ndarray, dataset: str, image_size: int, rng=None,
                  jitter: bool = True, restyle_prob: float = 0.0) -> np.ndarray:
  """uint8 [h, w, 1 or 3] -> float32 [S, S, 3] in [-1, 1]; with `rng`, the training
  augmentation of `dataset`: its random crop (`CROP_AREA`), then its colour jitter
  (`JITTERED`; `jitter=False`: the crop only), which redraws `restyle_prob` of the images
  in another style (`random_jitter`)."""
  area = CROP_AREA[dataset] if rng is not None else None
  box = random_box(image.shape[0], area, rng) if area else None
  jittered = rng is not None and jitter and dataset in JITTERED
  return preprocess(image, image_size, box,
                    random_jitter(rng, restyle_prob) if jittered else None)
