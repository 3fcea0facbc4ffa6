"""ftjax: fine-tune pre-trained language models with JAX (full and LoRA, any mesh)."""
