"""Full fine-tuning's DPO / IPO reference: the starting model's reply log-probs, computed once and kept in the workdir.

The reference is the model before the first step; under full fine-tuning keeping it would mean a second copy of
every weight, so its summed log-prob of each chosen and rejected reply is computed in one pass before training
(`pair_reference_logps`) and carried by the batches as `ref_logps`. The workdir keeps them under their identity
(base content hash, dtypes, the tokenized pairs' hash, template, data.seq_len, data.overlong): a resume reuses
them, and a run whose identity differs is refused in one line rather than trained against the wrong reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ftjax.data.pair_rows import PairRows
from ftjax.errors import ConfigError
from ftjax.objectives.preference_term import pair_reference_logps
from ftjax.whole_file import write_whole

CACHE_NAME = "reference_logps.npz"


def pairs_digest(rows: PairRows | None) -> str:
    """sha256 of the tokenized pairs in their order (tokens, trained masks, boundaries): what the cache indexes."""
    h = hashlib.sha256()
    if rows is not None:
        for ex in (rows.pairs.chosen, rows.pairs.rejected):
            for a in (ex.ids, ex.trained, ex.starts, ex.lengths):
                h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _first_difference(saved: dict, current: dict) -> str:
    for key in current:
        if saved.get(key) != current[key]:
            return key
    return next(iter(saved.keys() - current.keys()), "?")


def _load(path: Path, identity: dict) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        saved = json.loads(str(f["identity"]))
        if saved != identity:
            raise ConfigError(f"{path}: the reference log-probs were computed for another {_first_difference(saved, identity)} "
                              "(base, dtypes, data, template, data.seq_len or data.overlong changed); start a new "
                              "run with --workdir=NEW")
        return {k: f[k] for k in f.files if k != "identity"}


def _save(path: Path, identity: dict, arrays: dict[str, np.ndarray]) -> None:
    """Whole or not at all (tmp file, then rename); process 0 only."""
    buf = io.BytesIO()
    np.savez(buf, identity=np.asarray(json.dumps(identity, sort_keys=True)), **arrays)
    write_whole(path, buf.getvalue())


def with_reference(identity: dict, workdir: Path, model: Any, data: Any, batch_size: int, loss_chunk: int,
                   say=print) -> Any:
    """`data` (PreferenceDatasets) whose train and eval rows carry the reference log-probs of `model` (the model
    before its first step): read from the workdir's cache when its identity matches, else computed once and
    saved; a cache of another identity is refused."""
    identity = json.loads(json.dumps(identity, sort_keys=True))
    path = Path(workdir) / CACHE_NAME
    arrays = _load(path, identity)
    if arrays is None:
        batch, chunk = int(batch_size), int(loss_chunk)
        arrays = {"train": pair_reference_logps(model, data.train, batch, chunk)}
        if data.eval is not None:
            arrays["eval"] = pair_reference_logps(model, data.eval, batch, chunk)
        if jax.process_index() == 0:
            _save(path, identity, arrays)
        say(f"reference log-probs of {len(arrays['train'])} train pairs computed, saved in {path}")
    else:
        say(f"reference log-probs reused from {path}")
    ev = data.eval.with_reference(arrays["eval"]) if data.eval is not None else None
    return dataclasses.replace(data, train=data.train.with_reference(arrays["train"]), eval=ev)
