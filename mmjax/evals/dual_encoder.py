"""Builds the dual-encoder evaluators (zero-shot, retrieval) from a `DualEncoder` capability.

The eval data: a dataset of `mmjax.data.pipeline` (default: the task's training dataset,
`EvalData.dataset`) at the task's image size; it is built on first use.
"""

from mmjax.data import captions
from mmjax.data import pipeline
from mmjax.evals.retrieval import RetrievalEvaluator
from mmjax.evals.zeroshot import ZeroShotEvaluator


def _dataset(dataset, data) -> str:
  dataset = dataset or data.dataset
  pipeline.build(dataset, data.data_dir)
  return dataset


def _encoders(capabilities, evaluator: str) -> dict:
  encoder = capabilities.require('dual_encoder', evaluator)
  return dict(encode_image=encoder.encode_image, encode_text=encoder.encode_text,
              tokenize=encoder.tokenize)


def zeroshot_from_config(capabilities, data, mesh, *, name, batch_size, dataset=None,
                         templates='hand') -> ZeroShotEvaluator:
  """templates: 'name' (the class name alone), 'hand' (the dataset's own) or 'clip80'."""
  dataset = _dataset(dataset, data)
  splits = {split_name: pipeline.load_eval(dataset, split, data.data_dir, data.image_size)
            for split_name, split in pipeline.eval_splits(dataset).items()}
  return ZeroShotEvaluator(
      class_names=pipeline.class_names(dataset, data.data_dir),
      templates=captions.zeroshot_templates(dataset, templates), splits=splits,
      batch_size=batch_size, mesh=mesh, **_encoders(capabilities, f'config.evals.{name}'))


def retrieval_from_config(capabilities, data, mesh, *, name, batch_size,
                          dataset=None) -> RetrievalEvaluator:
  """Image <-> text Recall@K on the dataset's retrieval splits."""
  dataset = _dataset(dataset, data)
  splits = pipeline.load_retrieval(dataset, data.data_dir, data.image_size)
  return RetrievalEvaluator(splits=splits, batch_size=batch_size, mesh=mesh,
                            **_encoders(capabilities, f'config.evals.{name}'))
