"""What a task offers its evaluators: plain jittable functions of `(params, inputs)`.

An evaluator builder takes the capability it needs and the task's eval data (`EvalData`),
never the task itself, as big_vision's evaluators take `predict_fn`s: a new family that
offers `DualEncoder` gets zero-shot and retrieval evaluation without changes here. A task
states what it offers by returning a `Capabilities` record from `Task.capabilities()`.

Every function below is pure and jittable; `params` is the task's (unboxed) params tree.
Images are float32 in [-1, 1].
"""

import dataclasses
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class DualEncoder:
  """Images and texts into one embedding space (CLIP, SigLIP).

  encode_image: `(params, images [b, S, S, 3]) -> float32 [b, d]` unit vectors.
  encode_text: `(params, token_ids int32 [b, l]) -> float32 [b, d]` unit vectors.
  tokenize: `(texts: list[str]) -> np.ndarray int32 [n, l]`, host-side, the ids that
    `encode_text` reads (the task's tokenizer at its text length).
  """
  encode_image: Callable[[Any, Any], Any]
  encode_text: Callable[[Any, Any], Any]
  tokenize: Callable[[list[str]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class ImageTokenizer:
  """Images to discrete tokens and back (the VQ tokenizer).

  tokenize: `(params, images [b, H, W, 3]) -> int32 [b, T]` in `[0, num_codes)`.
  detokenize: `(params, tokens int32 [b, T]) -> float32 images [b, H, W, 3]`.
  """
  tokenize: Callable[[Any, Any], Any]
  detokenize: Callable[[Any, Any], Any]
  num_codes: int


@dataclasses.dataclass(frozen=True)
class Scorer:
  """How likely a model finds the weighted part of each row (ranking candidates).

  score: `(params, batch) -> float32 [b]`, the mean log-probability of each row's weighted
    targets; batch = {'image' (the row's images: [b, K, S, S, 3] for Flamingo, [b, S, S, 3]
    for Chameleon), 'tokens', 'targets' int32 [b, L], 'loss_weights' float32 [b, L]}.
  """
  score: Callable[[Any, dict], Any]


@dataclasses.dataclass(frozen=True)
class TokenStatistics:
  """A decoder's per-token statistics on scored rows (training-stability diagnostics).

  statistics: `(params, batch) -> {'log_prob' float32 [b, L]: the log-probability of each
    target, 'logsumexp' float32 [b, L]: logsumexp of the output logits at each position,
    'is_image' bool [b, L]: the target is an image code, 'max_attention_logit' float32 [b]:
    the largest pre-softmax attention logit of the row in any layer}`; batch as `Scorer`'s.
  """
  statistics: Callable[[Any, dict], Any]


@dataclasses.dataclass(frozen=True)
class Generator:
  """Greedy continuations of left-padded prompts that read images.

  generate: `(params, batch) -> int32 [b, max_new_tokens]`, batch = {'image' [b, ..., S, S,
    3] (the row's images, one per image placeholder), 'prompt_tokens' int32 [b, P],
    'prompt_mask' bool [b, P] (True on real tokens, padding on the left)}; each row ends at
    its stop token, pad after it. Decode the ids with the `EvalData.tokenizer`.
  """
  generate: Callable[[Any, dict], Any]


@dataclasses.dataclass(frozen=True)
class ImageEmbedder:
  """A fixed image representation for nearest-neighbour retrieval (e.g. of demonstrations).

  embed: `(params, images [b, S, S, 3]) -> float32 [b, d]` unit vectors.
  """
  embed: Callable[[Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class ImageGenerator:
  """Images from text -> image prompts (an early-fusion decoder and its VQ decoder).

  generate: `(params, batch) -> float32 images [b, S, S, 3]` about [-1, 1]; batch =
    {'prompt_tokens' int32 [b, P], 'prompt_mask' bool [b, P] (left padded; each prompt ends
    with the begin-image marker), 'seed' int32 [b] (the batch draws with its first seed)}.
    Sampling and guidance are the task's settings.
  """
  generate: Callable[[Any, dict], Any]


@dataclasses.dataclass(frozen=True)
class Judge:
  """Another run's dual encoder that scores what this model generates (e.g. a CLIP run of
  ours naming generated images): its `DualEncoder` and the `params` it reads."""
  dual_encoder: DualEncoder
  params: Any


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """The capabilities one task offers; None where it offers none of that kind."""
  dual_encoder: DualEncoder | None = None
  image_tokenizer: ImageTokenizer | None = None
  scorer: Scorer | None = None
  token_statistics: TokenStatistics | None = None
  generator: Generator | None = None
  image_embedder: ImageEmbedder | None = None
  image_generator: ImageGenerator | None = None
  judge: Judge | None = None

  def offered(self) -> list[str]:
    return [field.name for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None]

  def require(self, name: str, evaluator: str):
    """The capability `name`, or a ValueError naming the evaluator that needs it."""
    capability = getattr(self, name)
    if capability is None:
      raise ValueError(f'{evaluator} needs the {name} capability; this task offers '
                       f'{self.offered() or "none"}')
    return capability


@dataclasses.dataclass(frozen=True)
class EvalData:
  """Where a task's evaluators read their data, and the format the task's model reads.

  data_dir: the datasets' directory (built on first use by the evaluator that reads them).
  image_size: S, the side of the images the model takes.
  dataset: the default dataset of dataset-generic evaluators (zero-shot, retrieval,
    reconstruction): the training dataset.
  tokenizer: the task's tokenizer (prompt rows, decoding generated ids); None if none.
  num_image_tokens: image placeholder tokens per image in a prompt (LLaVA: one per patch).
  prompt_len: the length of generation prompts; None = the longest prompt.
  """
  data_dir: str
  image_size: int
  dataset: str | None = None
  tokenizer: Any = None
  num_image_tokens: int = 0
  prompt_len: int | None = None
