"""ftjax: fine-tune pre-trained language models with JAX (full and LoRA, any mesh).

`load_model` and `load_tokenizer` are imported lazily so that `import ftjax` (and flag
parsing in the scripts) stays fast.
"""

__all__ = ["load_model", "load_tokenizer"]


def __getattr__(name):
    if name in __all__:
        from ftjax import api

        return getattr(api, name)
    raise AttributeError(f"module 'ftjax' has no attribute {name!r}")
