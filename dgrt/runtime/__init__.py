"""The runtime: tokenizer and chat template, backends, KV cache, sampler and the block-diffusion loop."""
