"""What the TFDS builders of mmjax share: datasets made from what is installed on this
machine (pip and apt packages), written as ArrayRecord files, nothing downloaded.

A builder subclasses `Builder` and sets `VERSION`, `FEATURES` ({name: tfds feature}),
`HOMEPAGE` and, when needed, `LICENSE` and `METADATA = True` (it fills `info.metadata`); its
`split_examples()` returns {split: [(key, example), ...]}. The dataset's description is its
module's docstring.
"""

import sys

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

IMAGE_SIZE = 64  # The side of the drawn datasets' square images (emoji, Tux Paint).


def to_square(rgba: Image.Image) -> np.ndarray | None:
  """Crops to the opaque bounding box, puts it on white, pads to a square: uint8
  [IMAGE_SIZE, IMAGE_SIZE, 3]; None if no pixel is opaque."""
  bbox = rgba.getchannel('A').getbbox()
  if bbox is None:
    return None
  glyph = rgba.crop(bbox)
  side = max(glyph.size)
  square = Image.new('RGBA', (side, side), 'white')
  square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
  square = square.convert('RGB').resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
  return np.asarray(square)


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A dataset built from installed packages, in ArrayRecord files (see the module)."""

  # Nothing to download: skip TFDS's checksums lookup, which on Python >= 3.9 imports the
  # `importlib_resources` backport that TFDS does not install.
  code_path = None
  FEATURES: dict = {}
  HOMEPAGE: str | None = None
  LICENSE: str | None = None
  METADATA = False

  def __init__(self, **kwargs):
    super().__init__(file_format='array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=sys.modules[type(self).__module__].__doc__,
        features=tfds.features.FeaturesDict(dict(self.FEATURES)),
        metadata=tfds.core.MetadataDict() if self.METADATA else None,
        homepage=self.HOMEPAGE,
        license=self.LICENSE,
    )

  def split_examples(self) -> dict[str, list]:
    """{split: [(key, example), ...]}."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything comes from installed packages.
    return {split: self._generate_examples(examples)
            for split, examples in self.split_examples().items()}

  def _generate_examples(self, examples):
    yield from examples
