"""Training data: JSONL / JSON / TFDS records -> chat-templated, loss-masked, packed batches through Grain.

What the trainer calls:

    data = build_datasets(spec, tokenizer, vocab_size=model_cfg.vocab_size)   # all checks, before compute
    print(data.summary.format())                  # records, dropped by reason, tokens, packing efficiency...
    it = train_iterator(data.train, batch_size, seed=spec.seed, sharding=batch_sharding, prefetch=spec.prefetch)
    it.set_state(saved)                           # resume: the next batch is exactly the one after `saved`
    batch = next(it); saved = it.get_state()      # small JSON-able dict, stored with the checkpoint
    for batch in eval_iterator(data.eval, batch_size, sharding=batch_sharding): ...
    data_fingerprints(spec)                       # {source: {size, sha256}}; compare before resuming

`spec` is the run's data part (`ftjax.data.spec.DataSpec`: its `data.*` keys and seed; the composition step,
`ftjax.train.compose`, reads it from the run config).

- `build_datasets(spec, tokenizer, *, vocab_size=None) -> Datasets(train: PackedRows, eval: PackedRows | None,
  summary: DataSummary)`. Raises `ftjax.errors.DataError` naming file:line for bad input.
- `train_iterator(rows, batch_size, *, seed, num_epochs=None, process_index=None, process_count=None,
  sharding=None, prefetch=4) -> TrainIterator` (endless by default; `get_state()`, `set_state(state)`).
- `eval_iterator(rows, batch_size, *, process_index=None, process_count=None, sharding=None)`: fixed
  order; the last batch is padded with rows of zero weight.
- `data_fingerprints(spec) -> dict`; `prepare_jsonl({split: [files]}, data_dir)` writes local JSONL as
  the `jsonl_records` TFDS dataset (ArrayRecord), read back with `data.tfds_name=jsonl_records`.

A batch (numpy, process-local; or global jax Arrays with `sharding`): `input_ids`, `targets` (next
token of the same example), `segment_ids` (1, 2, ... per packed example, 0 = padding), `positions`
(from 0 in each example) as int32 [B, T], and `loss_weights` float32 [B, T] (1 where the target is a
trained token). `data.train` is one file or a weighted mixture `a.jsonl:0.7,b.jsonl:0.3`
(see `ftjax.data.mixture`).
"""

import importlib
from typing import Any, Mapping, Sequence

from ftjax.data.build import Datasets, build_datasets, data_fingerprints
from ftjax.data.packing import BATCH_KEYS, PackedRows
from ftjax.data.spec import DataSpec
from ftjax.data.summary import DataSummary

# The Grain loader on first use, not on import: the train step needs only BATCH_KEYS from this package,
# and a benchmark or a GPU image without Grain must still import it.
_LOADER = {"TrainIterator", "eval_iterator", "train_iterator"}


def __getattr__(name: str) -> Any:
    if name in _LOADER:
        return getattr(importlib.import_module("ftjax.data.loader"), name)
    raise AttributeError(f"module 'ftjax.data' has no attribute {name!r}")


def prepare_jsonl(files: Mapping[str, Sequence[str]], data_dir: str) -> str:
    """Write local JSONL/JSON files as the `jsonl_records` TFDS dataset under data_dir (tfds loaded lazily)."""
    from ftjax.data.tfds_jsonl import prepare_jsonl as _prepare

    return _prepare(files, data_dir)


__all__ = ["BATCH_KEYS", "DataSpec", "DataSummary", "Datasets", "PackedRows", "TrainIterator", "build_datasets",
           "data_fingerprints", "eval_iterator", "prepare_jsonl", "train_iterator"]
