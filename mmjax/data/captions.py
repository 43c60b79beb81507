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


# The caption of each image in image-text retrieval on datasets that have names, not sentences.
RETRIEVAL_TEMPLATES = {'emoji': 'an emoji of {}.'}

# The 80 prompts of OpenAI CLIP's ImageNet zero-shot evaluation (its prompt-engineering
# notebook), in their order.
CLIP80_TEMPLATES = [
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
]

# Prompt sets by name for `config.evals.<name>.templates`: 'name' is the class name alone,
# 'hand' the dataset's small hand-written set, 'clip80' OpenAI's 80 ImageNet prompts.
TEMPLATE_SETS = ('name', 'hand', 'clip80')


def zeroshot_templates(dataset: str, template_set: str) -> list[str]:
  """The prompt templates (format strings with one `{}`) of a named set."""
  if template_set == 'name':
    return ['{}']
  if template_set == 'hand':
    return list(ZEROSHOT_TEMPLATES[dataset])
  if template_set == 'clip80':
    return list(CLIP80_TEMPLATES)
  raise ValueError(f'unknown zero-shot template set {template_set!r}; use one of {TEMPLATE_SETS}')


def random_caption(dataset: str, name: str, rng: np.random.Generator) -> str:
  """A training caption for `name` from a template drawn with `rng`."""
  templates = TRAIN_TEMPLATES[dataset]
  return templates[rng.integers(len(templates))].format(name)
