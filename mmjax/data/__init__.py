"""The data layer, by function; no module here imports a task, an evaluator or an experiment.

  digits.py, emoji.py, tuxpaint.py   the datasets, TFDS builders (`builder.py`: what they share)
  pipeline.py    build and read them: splits, names, eval splits, train iterators (CLIP, VQ)
  images.py      images as a model reads them, and their training augmentation
  captions.py    caption templates and zero-shot prompt ensembles
  tokenizers/    the tokenizers and their one registry
  instruct.py    image question-answer rows (LLaVA)
  interleaved.py interleaved image-text sequences and few-shot rows (Flamingo), with the one
                 hook of research curricula (their files: experiments/)
"""
