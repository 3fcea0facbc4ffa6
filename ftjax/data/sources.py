"""The run's data sources as every row builder reads them (SFT rows, preference pairs, distillation pairs): which
sources, their labels and fingerprints, the vocabulary check and the eval hold-out, so the builders cannot drift.

A source's `how` is a dict: `{"kind": "file", "path": ...}` or `{"kind": "tfds", "name", "split", "data_dir"}`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftjax.data.examples import Examples
from ftjax.data.fingerprint import file_fingerprint
from ftjax.data.mixture import parse_sources
from ftjax.data.records import check_data_file
from ftjax.data.spec import DataSpec
from ftjax.errors import DataError


def run_sources(d: DataSpec) -> tuple[list[tuple[str, float, dict]], dict | None]:
    """(train sources as (label, weight, how), eval source's how or None) of the run's data part."""
    if d.tfds_name and d.train:
        raise DataError("set either data.train (files) or data.tfds_name (a TFDS dataset), not both")
    if d.tfds_name:
        tf = dict(kind="tfds", name=d.tfds_name, data_dir=d.tfds_data_dir)
        train = [(f"tfds:{d.tfds_name}/{d.tfds_split}", 1.0, dict(tf, split=d.tfds_split))]
        ev = dict(tf, split=d.tfds_eval_split) if d.tfds_eval_split else None
        if d.eval:
            ev = dict(kind="file", path=d.eval)
    else:
        train = [(s.path, s.weight, dict(kind="file", path=s.path)) for s in parse_sources(d.train)]
        ev = dict(kind="file", path=d.eval) if d.eval else None
    return train, ev


def source_label(how: dict) -> str:
    """The name a source goes by in summaries, errors and fingerprints: its path, or tfds:name/split."""
    return how["path"] if how["kind"] == "file" else f"tfds:{how['name']}/{how['split']}"


def source_fingerprint(how: dict) -> dict[str, Any]:
    """Size + SHA-256 of a file source (checked readable first), or the TFDS dataset's; resume compares them."""
    if how["kind"] == "file":
        check_data_file(how["path"])
        return file_fingerprint(how["path"])
    from ftjax.data.tfds_source import tfds_fingerprint

    return tfds_fingerprint(how["name"], how["split"], how["data_dir"])


def check_vocab(examples: Examples, vocab_size: int | None) -> None:
    """DataError naming the first example with a token id at or above the model's vocabulary size."""
    if vocab_size is None or not len(examples.ids):
        return
    bad = np.flatnonzero(examples.ids >= vocab_size)
    if not len(bad):
        return
    ex = int(np.searchsorted(examples.starts, bad[0], side="right") - 1)
    raise DataError(f"{examples.source(ex)}: token id {int(examples.ids[bad[0]])} is outside the model's "
                    f"vocabulary (size {vocab_size}); the tokenizer does not match the model")


def eval_hold_out(examples: Examples, fraction: float, seed: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(train index, eval index) of train source `k`: `fraction` of its examples, chosen by seed, held out for eval."""
    n = len(examples)
    n_eval = int(round(fraction * n))
    perm = np.random.default_rng([seed, k, 0x6576616C]).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])
