"""Caption templates for training and prompt ensembles for zero-shot classification.

Both are plain lists of format strings with one `{}` for the class name. Zero-shot evaluation
embeds every prompt for a class and averages the (normalised) embeddings, as in CLIP.
"""

import numpy as np

TRAIN_TEMPLATES = {
    'digits': [
        'a handwritten {}.',
        'a drawing of the digit {}.',
        'the number {}, written by hand.',
        'a scan of a handwritten {}.',
        'a tiny, blurry handwritten {}.',
        'the digit {}.',
        '{}',
        'someone wrote the number {}.',
    ],
    'emoji': [
        'an emoji of {}.',
        '{}',
        'an icon of {}.',
        'the {} emoji.',
        'a drawing of {}.',
        'a small picture of {}.',
        'a sticker of {}.',
        'a symbol showing {}.',
    ],
}

ZEROSHOT_TEMPLATES = {
    'digits': [
        'a handwritten {}.',
        'a photo of the digit {}.',
        'a low resolution photo of the number {}.',
        'a blurry scan of a handwritten {}.',
        'a pixelated image of the digit {}.',
        'a black and white drawing of the number {}.',
        'the number {}.',
        'a {} written by hand.',
    ],
    'emoji': [
        'an emoji of {}.',
        '{}',
        'an icon of {}.',
        'a drawing of {}.',
        'a cartoon of {}.',
        'a simple illustration of {}.',
        'a small picture of {}.',
        'a colourful emoji of {}.',
        'a black and white icon of {}.',
        'the {} emoji.',
    ],
}


def random_caption(dataset: str, name: str, rng: np.random.Generator) -> str:
  """A training caption for `name` from a template drawn with `rng`."""
  templates = TRAIN_TEMPLATES[dataset]
  return templates[rng.integers(len(templates))].format(name)


def zeroshot_prompts(dataset: str, names: list[str]) -> list[list[str]]:
  """Returns `[len(names)][n_templates]` prompts: every zero-shot template for every name."""
  return [[t.format(n) for t in ZEROSHOT_TEMPLATES[dataset]] for n in names]
