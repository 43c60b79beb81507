"""Hugging Face `transformers` LlamaForCausalLM <-> `mmjax.models.decoder.DecoderLM`, both ways.

    config = config_from_hf(hf_model.config, scan=True)   # DecoderLM(**config)
    params = params_from_hf(hf_model.state_dict(), config)
    logits, _ = DecoderLM(**config).apply({'params': params}, tokens)
    state_dict = params_to_hf(params, config)  # numpy arrays, HF names and layouts

The Llama keys sit under `hf_prefix` (`model.` in LlamaForCausalLM,
`model.language_model.` in transformers 5's LlavaForConditionalGeneration) plus
`lm_head_key`; a model holding the LM as a submodule names it with `path` (e.g. `lm/`),
so `rules(config, hf_prefix=..., path=...)` serves converters of such models too.
With tied embeddings HF's `lm_head.weight` is the embedding table: import ignores it,
export writes a copy so `load_state_dict(strict=True)` finds it.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert import weight_map
from mmjax.models.decoder import DecoderLM

_UNSUPPORTED = (  # (HF config field, value it must have, what we would need)
    ('hidden_act', 'silu', 'the SwiGLU activation'),
    ('mlp_bias', False, 'MLP biases'),
)


def _rope(hf_config) -> dict:
  """`rope_parameters` (transformers 5) or the older `rope_theta` / `rope_scaling` fields."""
  rope = dict(getattr(hf_config, 'rope_parameters', None) or {})
  rope.setdefault('rope_theta', getattr(hf_config, 'rope_theta', 10000.0))
  rope.setdefault('rope_type', (getattr(hf_config, 'rope_scaling', None) or {}).get(
      'rope_type', 'default'))
  return rope


def config_from_hf(hf_config, *, scan: bool = True) -> dict:
  """`transformers.LlamaConfig` -> kwargs for `DecoderLM(...)`.

  Raises ValueError naming each field whose value DecoderLM does not implement.
  """
  problems = [f'{field}={getattr(hf_config, field, want)!r} ({what}); supported: {want!r}'
              for field, want, what in _UNSUPPORTED
              if getattr(hf_config, field, want) != want]
  rope = _rope(hf_config)
  if rope['rope_type'] != 'default':
    problems.append(f"rope_type={rope['rope_type']!r} (scaled rotary frequencies); "
                    "supported: 'default'")
  if problems:
    raise ValueError('LlamaConfig not supported:\n  ' + '\n  '.join(problems))
  num_heads = hf_config.num_attention_heads
  return dict(
      vocab_size=hf_config.vocab_size, width=hf_config.hidden_size,
      depth=hf_config.num_hidden_layers, num_heads=num_heads,
      num_kv_heads=hf_config.num_key_value_heads or num_heads,
      mlp_dim=hf_config.intermediate_size,
      head_dim=getattr(hf_config, 'head_dim', None) or hf_config.hidden_size // num_heads,
      rope_theta=float(rope['rope_theta']), norm_eps=hf_config.rms_norm_eps,
      attention_bias=bool(hf_config.attention_bias),
      tie_embeddings=bool(hf_config.tie_word_embeddings), scan=scan)


def attention_rules(hf: str, ours: str, num_heads: int, num_kv_heads: int,
                    bias: bool) -> list[weight_map.Rule]:
  """HF `{q,k,v,o}_proj` (`[heads * head_dim, width]`) <-> `layers.Attention` kernels."""
  rules = []
  for hf_name, name, heads in (('q_proj', 'query', num_heads), ('k_proj', 'key', num_kv_heads),
                               ('v_proj', 'value', num_kv_heads)):
    rules.append(weight_map.one(f'{hf}.{hf_name}.weight', f'{ours}/{name}/kernel',
                                lambda w, h=heads: w.T.reshape(w.shape[1], h, -1),
                                lambda k: k.reshape(k.shape[0], -1).T))
    if bias:
      rules.append(weight_map.one(f'{hf}.{hf_name}.bias', f'{ours}/{name}/bias',
                                  lambda b, h=heads: b.reshape(h, -1), lambda b: b.reshape(-1)))
  rules.append(weight_map.one(f'{hf}.o_proj.weight', f'{ours}/out/kernel',
                              lambda w: w.T.reshape(num_heads, -1, w.shape[0]),
                              lambda k: k.reshape(-1, k.shape[-1]).T))
  if bias:
    rules.append(weight_map.one(f'{hf}.o_proj.bias', f'{ours}/out/bias'))
  return rules


def qk_norm_rules(hf: str, ours: str) -> list[weight_map.Rule]:
  """HF Chameleon's `q_norm` / `k_norm` (`ChameleonLayerNorm`, weight and bias
  `[heads, head_dim]`) <-> `layers.Attention`'s `query_norm` / `key_norm` (same layout)."""
  return [weight_map.one(f'{hf}.{hf_name}.{hf_param}', f'{ours}/{name}/{param}')
          for hf_name, name in (('q_norm', 'query_norm'), ('k_norm', 'key_norm'))
          for hf_param, param in (('weight', 'scale'), ('bias', 'bias'))]


def _rms_norm(hf: str, ours: str) -> weight_map.Rule:
  return weight_map.one(f'{hf}.weight', f'{ours}/scale')


def rules(config: dict, *, hf_prefix: str = 'model.', lm_head_key: str = 'lm_head.weight',
          path: str = '') -> list[weight_map.Rule]:
  """Every Llama tensor and the param it becomes; our paths start with `path`.

  Blocks are named `{path}decoder/block_{i}` (see `stacked`). Tied embeddings have no
  `lm_head_key` rule.
  """
  num_kv_heads = config['num_kv_heads']
  result = [weight_map.one(f'{hf_prefix}embed_tokens.weight', f'{path}token_embed')]
  for i in range(config['depth']):
    hf, ours = f'{hf_prefix}layers.{i}', f'{path}decoder/block_{i}'
    result += [
        _rms_norm(f'{hf}.input_layernorm', f'{ours}/ln_attn'),
        *attention_rules(f'{hf}.self_attn', f'{ours}/attn', config['num_heads'], num_kv_heads,
                    weight_map.option(config, DecoderLM, 'attention_bias')),
        *(qk_norm_rules(f'{hf}.self_attn', f'{ours}/attn')
          if weight_map.option(config, DecoderLM, 'qk_norm') else []),
        _rms_norm(f'{hf}.post_attention_layernorm', f'{ours}/ln_mlp'),
        *weight_map.linear(f'{hf}.mlp.gate_proj', f'{ours}/mlp/gate', bias=False),
        *weight_map.linear(f'{hf}.mlp.up_proj', f'{ours}/mlp/up', bias=False),
        *weight_map.linear(f'{hf}.mlp.down_proj', f'{ours}/mlp/down', bias=False),
    ]
  result.append(_rms_norm(f'{hf_prefix}norm', f'{path}ln_final'))
  if not weight_map.option(config, DecoderLM, 'tie_embeddings'):
    result += weight_map.linear(lm_head_key.removesuffix('.weight'), f'{path}lm_head', bias=False)
  return result


def stacked(config: dict, path: str = '') -> tuple[str, ...]:
  """The `weight_map` `stacked` argument: our decoder's path when its blocks are scanned."""
  return (f'{path}decoder',) if weight_map.option(config, DecoderLM, 'scan') else ()


def expected_shapes(config: dict, path: str = '') -> dict[str, tuple[int, ...]]:
  """`{path + param path: shape}` of DecoderLM's params, blocks unstacked."""
  lm = DecoderLM(**dict(config, scan=False))
  init = lambda rng: nn.unbox(lm.init(rng, jnp.zeros((1, 1), jnp.int32)))['params']
  shapes = jax.eval_shape(init, jax.random.key(0))
  return {path + name: leaf.shape
          for name, leaf in flax.traverse_util.flatten_dict(shapes, sep='/').items()}


def params_from_hf(state_dict, config: dict, *, hf_prefix: str = 'model.',
                   lm_head_key: str = 'lm_head.weight', checkpoint=None) -> dict:
  """HF LlamaForCausalLM `state_dict` (torch tensors or numpy) -> our float32 numpy params.

  `config` is `config_from_hf(...)` (any DecoderLM kwargs): heads to split projections
  into, whether blocks are stacked (`scan`). `checkpoint`: the `weight_map.Checkpoint` the
  state dict was read from, if any. Raises ValueError naming every HF key missing (and,
  with a checkpoint, its directory and the file the key was expected in), unused or
  mis-shaped.
  """
  arrays = {key: weight_map.to_numpy(value) for key, value in state_dict.items()}
  tied = weight_map.option(config, DecoderLM, 'tie_embeddings')
  flat = weight_map.to_ours(arrays, rules(config, hf_prefix=hf_prefix, lm_head_key=lm_head_key),
                            expected_shapes(config), stacked(config),
                            ignore=lambda key: tied and key == lm_head_key,
                            checkpoint=checkpoint)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def params_to_hf(params, config: dict, *, hf_prefix: str = 'model.',
                 lm_head_key: str = 'lm_head.weight') -> dict[str, np.ndarray]:
  """Our params (numpy or jax, boxed or not) -> `{HF key: numpy array}`, dtypes kept.

  Raises ValueError naming every param missing, unknown or mis-shaped, with the HF key it
  would become.
  """
  flat = {name: np.asarray(value) for name, value
          in flax.traverse_util.flatten_dict(nn.unbox(params), sep='/').items()}
  state_dict = weight_map.to_hf(flat, rules(config, hf_prefix=hf_prefix, lm_head_key=lm_head_key),
                                expected_shapes(config), stacked(config))
  if weight_map.option(config, DecoderLM, 'tie_embeddings'):
    state_dict[lm_head_key] = state_dict[f'{hf_prefix}embed_tokens.weight'].copy()
  return state_dict
