"""The text tower's mean pool (`pool='mean'`): the mean of the tokens from the first up to the
end-of-text token, padding left out (its config key: tests/test_config_validation.py)."""

import flax.linen as nn
import jax
import numpy as np

from mmjax.models.clip import TextTower


def test_mean_pool_averages_the_tokens_up_to_end_of_text():
  # Rows [BOS, ids..., EOT (the highest id), pad...] of different lengths, one unpadded.
  token_ids = np.array([[98, 5, 7, 99, 0, 0], [98, 99, 0, 0, 0, 0], [98, 3, 4, 5, 6, 99]],
                       np.int32)
  tower = lambda pool: TextTower(vocab_size=100, context_length=6, width=16, depth=1,
                                 num_heads=2, pool=pool)
  params = nn.unbox(tower('mean').init(jax.random.key(0), token_ids)['params'])
  pooled, tokens = tower('mean').apply({'params': params}, token_ids)
  _, eot_tokens = tower('eot').apply({'params': params}, token_ids)  # same params, same tokens
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(eot_tokens))
  tokens = np.asarray(tokens, np.float64)
  expected = np.stack([tokens[0, :4].mean(0), tokens[1, :2].mean(0), tokens[2].mean(0)])
  np.testing.assert_allclose(np.asarray(pooled), expected, rtol=1e-5, atol=1e-6)
  # Padding changes nothing: a causal tower's tokens before the padding do not see it.
  longer = np.pad(token_ids, ((0, 0), (0, 2)))
  wide = TextTower(vocab_size=100, context_length=8, width=16, depth=1, num_heads=2,
                   pool='mean')
  wide_params = dict(params, pos_embed=np.pad(np.asarray(params['pos_embed']), ((0, 2), (0, 0))))
  pooled_longer, _ = wide.apply({'params': wide_params}, longer)
  np.testing.assert_allclose(np.asarray(pooled_longer), np.asarray(pooled), rtol=1e-5,
                             atol=1e-6)
