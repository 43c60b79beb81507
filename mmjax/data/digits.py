"""scikit-learn's 1,797 handwritten digits as a TFDS dataset (ArrayRecord, no TF needed).

Each example: `image` uint8 [8, 8, 1] in 0..255, `label` int64 in 0..9, `name` ("seven"),
`style` ("handwritten"). Splits `train`/`test` are a fixed, seeded, stratified 80/20 split.
"""

import numpy as np
import sklearn.datasets
import sklearn.model_selection
import tensorflow_datasets as tfds

NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
STYLE = 'handwritten'
SPLIT_SEED = 0
TEST_FRACTION = 0.2


class Digits(tfds.core.GeneratorBasedBuilder):
  """8x8 grayscale handwritten digits with their English names."""

  VERSION = tfds.core.Version('1.0.0')
  # Nothing to download: skip TFDS's checksums lookup, which on Python >= 3.9 imports the
  # `importlib_resources` backport that TFDS does not install.
  code_path = None

  def __init__(self, **kwargs):
    super().__init__(file_format='array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.Scalar(dtype=np.int64),
            'name': tfds.features.Text(),
            'style': tfds.features.Text(),
        }),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    digits = sklearn.datasets.load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    train, test = sklearn.model_selection.train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels,
        random_state=SPLIT_SEED)
    return {
        'train': self._generate_examples(images, labels, train),
        'test': self._generate_examples(images, labels, test),
    }

  def _generate_examples(self, images, labels, indices):
    for i in sorted(indices):
      yield int(i), {
          'image': images[i],
          'label': labels[i],
          'name': NAMES[labels[i]],
          'style': STYLE,
      }
