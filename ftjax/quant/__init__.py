"""Quantized frozen weights: NF4 (QLoRA, bitsandbytes numerics), int8 absmax, GGUF blocks.

Quantization runs once on the host in numpy; dequantization is plain jnp, cheap enough to run
inside a jitted layer so that only one layer's full-precision weights exist at a time.
"""
