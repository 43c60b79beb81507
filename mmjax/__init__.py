"""mmjax: multimodal transformers in JAX/Flax, sharded over a device mesh."""
