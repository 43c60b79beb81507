"""Images of a built dataset as a model reads them: float32 [S, S, 3] in [-1, 1], with the
training augmentation of each dataset (a random square crop, photometric jitter).

Every random draw comes from the `rng` passed in, so an example's augmentation is a function
of (seed, position in the stream) and iterators restore exactly.
"""

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

JITTERED = ('emoji', 'tuxpaint')  # Datasets whose training images get `random_jitter`.
# Range of the random crop's area fraction (None: no crop).
CROP_AREA = {'digits': None, 'emoji': (0.8, 1.0), 'tuxpaint': (0.8, 1.0)}


def preprocess(image: np.ndarray, image_size: int, box=None, jitter=None) -> np.ndarray:
  """uint8 [h, w, 1 or 3] -> float32 [S, S, 3] in [-1, 1]; crops to `box` (x0, y0, x1, y1)
  and applies `jitter` (from `random_jitter`) before resizing."""
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert('RGB')
  if jitter:
    pil = ImageEnhance.Brightness(pil).enhance(jitter['brightness'])
    pil = ImageEnhance.Contrast(pil).enhance(jitter['contrast'])
    pil = ImageEnhance.Color(pil).enhance(jitter['saturation'])
    if jitter['blur']:
      pil = pil.filter(ImageFilter.GaussianBlur(jitter['blur']))
  pil = pil.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
  return np.asarray(pil, np.float32) / 127.5 - 1


def random_jitter(rng: np.random.Generator) -> dict[str, float]:
  """Photometric jitter that keeps hues (names say "red", "green"): brightness, contrast,
  saturation factors in [0.7, 1.3] and, half the time, a Gaussian blur of up to 1.5 source
  pixels, so a drawing style's sharp outlines or soft shading is not a shortcut."""
  brightness, contrast, saturation = rng.uniform(0.7, 1.3, 3)
  blur = rng.uniform(0, 1.5) if rng.uniform() < 0.5 else 0.0
  return dict(brightness=brightness, contrast=contrast, saturation=saturation, blur=blur)


def random_box(size: int, area: tuple[float, float], rng: np.random.Generator):
  """A random square crop box covering a fraction in `area` of a [size, size] image."""
  side = size * np.sqrt(rng.uniform(*area))
  x0, y0 = rng.uniform(0, size - side, 2)
  return (x0, y0, x0 + side, y0 + side)


def prepare_image(image: np.ndarray, dataset: str, image_size: int, rng=None,
                  jitter: bool = True) -> np.ndarray:
  """uint8 [h, w, 1 or 3] -> float32 [S, S, 3] in [-1, 1]; with `rng`, the training
  augmentation of `dataset`: its random crop (`CROP_AREA`), then its colour jitter
  (`JITTERED`; `jitter=False`: the crop only)."""
  area = CROP_AREA[dataset] if rng is not None else None
  box = random_box(image.shape[0], area, rng) if area else None
  jittered = rng is not None and jitter and dataset in JITTERED
  return preprocess(image, image_size, box, random_jitter(rng) if jittered else None)
