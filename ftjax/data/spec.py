"""What the data builders read of a run: its `data.*` keys and the seed of its draws (the eval hold-out, the mixture,
the row order). The composition step fills it from the run config; nothing under `ftjax/data/` sees the config."""

from __future__ import annotations

import dataclasses

from ftjax.data.records import Fields


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The run's `data.*` keys (their meanings: ftjax/config.py) and `seed`."""

    train: str | None
    eval: str | None
    seq_len: int
    packing: bool
    max_segments: int
    overlong: str
    eval_fraction: float
    on_bad_record: str
    max_dropped_fraction: float
    loss_on: str
    messages_field: str
    prompt_field: str
    completion_field: str
    text_field: str
    tfds_name: str | None
    tfds_data_dir: str | None
    tfds_split: str
    tfds_eval_split: str | None
    cache_dir: str | None
    prefetch: int
    seed: int

    @property
    def fields(self) -> Fields:
        """Where a record keeps its chat, prompt, completion and plain text."""
        return Fields(self.messages_field, self.prompt_field, self.completion_field, self.text_field)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The `data.*` keys it holds (all but `seed`)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "seed")
