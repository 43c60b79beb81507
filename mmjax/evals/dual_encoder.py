"""Builds the dual-encoder evaluators (zero-shot, retrieval) from a task and its config.

The task provides `encode_image(params, images)`, `encode_text(params, token_ids)`,
`tokenizer`, `config` and `data_dir`; the eval config names the dataset (default: the
training dataset), the batch size and the evaluator's own options.
"""

from mmjax.data import captions
from mmjax.data import pipeline
from mmjax.evals.retrieval import RetrievalEvaluator
from mmjax.evals.zeroshot import ZeroShotEvaluator


def _dataset(eval_config, task) -> str:
  dataset = eval_config.get('dataset') or task.config.data.name
  pipeline.build(dataset, task.data_dir)
  return dataset


def _encoders(task) -> dict:
  return dict(encode_image=task.encode_image, encode_text=task.encode_text,
              tokenizer=task.tokenizer, max_text_len=task.config.data.max_text_len)


def zeroshot_from_config(eval_config, task, mesh) -> ZeroShotEvaluator:
  """Options: dataset, templates ('name' | 'hand' | 'clip80'), batch_size."""
  dataset = _dataset(eval_config, task)
  image_size = task.config.data.image_size
  splits = {name: pipeline.load_eval(dataset, split, task.data_dir, image_size)
            for name, split in pipeline.eval_splits(dataset).items()}
  return ZeroShotEvaluator(
      class_names=pipeline.class_names(dataset, task.data_dir),
      templates=captions.zeroshot_templates(dataset, eval_config.get('templates', 'hand')),
      splits=splits, batch_size=eval_config.batch_size, mesh=mesh, **_encoders(task))


def retrieval_from_config(eval_config, task, mesh) -> RetrievalEvaluator:
  """Options: dataset, batch_size."""
  dataset = _dataset(eval_config, task)
  splits = pipeline.load_retrieval(dataset, task.data_dir, task.config.data.image_size)
  return RetrievalEvaluator(splits=splits, batch_size=eval_config.batch_size, mesh=mesh,
                            **_encoders(task))
