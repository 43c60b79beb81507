"""scikit-learn's 1,797 handwritten digits as a TFDS dataset (ArrayRecord, no TF needed).

Each example: `image` uint8 [8, 8, 1] in 0..255, `label` int64 in 0..9, `name` ("seven"),
`style` ("handwritten"). Splits `train`/`test` are a fixed, seeded, stratified 80/20 split.
"""

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import builder

NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
STYLE = 'handwritten'
SPLIT_SEED = 0
TEST_FRACTION = 0.2


class Digits(builder.Builder):
  """8x8 grayscale handwritten digits with their English names."""

  VERSION = tfds.core.Version('1.0.0')
  FEATURES = {
      'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
      'label': tfds.features.Scalar(dtype=np.int64),
      'name': tfds.features.Text(),
      'style': tfds.features.Text(),
  }
  HOMEPAGE = 'https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset'

  def split_examples(self):
    # Imported when the dataset is built, not whenever mmjax.data is (seconds per process).
    import sklearn.datasets  # pylint: disable=g-import-not-at-top
    import sklearn.model_selection  # pylint: disable=g-import-not-at-top
    digits = sklearn.datasets.load_digits()  # The data ships with scikit-learn.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    train, test = sklearn.model_selection.train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels,
        random_state=SPLIT_SEED)
    return {split: [(int(i), {'image': images[i], 'label': labels[i],
                              'name': NAMES[labels[i]], 'style': STYLE})
                    for i in sorted(indices)]
            for split, indices in (('train', train), ('test', test))}
