"""The default run config, unchanged: what `benchmarks/gpu/bench.py` times (it sets only model.path, method,
data.seq_len and train.batch_size on the command line)."""

from ftjax.config import default_config


def get_config():
    return default_config()
