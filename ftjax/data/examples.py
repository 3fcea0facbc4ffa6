"""Tokenized examples stored flat in a few numpy arrays: cheap to subset, cache to disk and read rows from.

Example i is `ids[starts[i] : starts[i] + lengths[i]]`; `trained[j]` says token j is a trained target
(the loss is taken on predicting it). Subsets and truncation only touch `starts`/`lengths`.
Where each example came from is `origins[origin[i]]:lines[i]` (file:line), kept compact for big datasets.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import numpy as np

from ftjax.whole_file import write_whole


@dataclasses.dataclass
class Examples:
    """Tokenized examples (see module docstring); `digests` hash each record's content for duplicate checks."""

    ids: np.ndarray  # int32 [N]
    trained: np.ndarray  # bool [N]
    starts: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int64 [n]
    digests: np.ndarray  # uint64 [n]
    origin: np.ndarray  # int32 [n], index into origins
    lines: np.ndarray  # int64 [n], line (or record number) in its origin
    origins: np.ndarray  # str [k], file paths / dataset names

    def __len__(self) -> int:
        return len(self.starts)

    def source(self, i: int) -> str:
        """"file:line" of example i, as error messages name it."""
        return f"{self.origins[self.origin[i]]}:{int(self.lines[i])}"

    @staticmethod
    def locate(sources: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """("file:line" strings) -> (origin index, lines, origins)."""
        names: dict[str, int] = {}
        origin, lines = np.zeros(len(sources), np.int32), np.zeros(len(sources), np.int64)
        for k, src in enumerate(sources):
            head, _, tail = src.rpartition(":")
            if not head or not tail.isdigit():
                head, tail = src, "0"
            origin[k], lines[k] = names.setdefault(head, len(names)), int(tail)
        return origin, lines, np.array(list(names), dtype=str) if names else np.zeros(0, str)

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, trained) of example i."""
        s, n = int(self.starts[i]), int(self.lengths[i])
        return self.ids[s:s + n], self.trained[s:s + n]

    def take(self, index: np.ndarray | Sequence[int]) -> "Examples":
        """The examples at `index` (repeats allowed); token arrays are shared, not copied."""
        index = np.asarray(index, np.int64)
        return Examples(self.ids, self.trained, self.starts[index], self.lengths[index], self.digests[index],
                        self.origin[index], self.lines[index], self.origins)

    def with_lengths(self, lengths: np.ndarray) -> "Examples":
        """Same examples cut to `lengths` (each ≤ the current length)."""
        return dataclasses.replace(self, lengths=np.asarray(lengths, np.int64))

    def trained_targets(self) -> np.ndarray:
        """Per example: the number of trained targets (trained tokens after the first)."""
        csum = np.concatenate([[0], np.cumsum(self.trained, dtype=np.int64)])
        first = np.minimum(self.starts + 1, self.starts + self.lengths)
        return csum[self.starts + self.lengths] - csum[first]

    @staticmethod
    def concat(parts: Sequence["Examples"]) -> "Examples":
        """One Examples holding all parts in order (token arrays are copied once)."""
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
        names = np.cumsum([0] + [len(p.origins) for p in parts[:-1]])
        return Examples(
            np.concatenate([p.ids for p in parts]).astype(np.int32),
            np.concatenate([p.trained for p in parts]).astype(bool),
            np.concatenate([p.starts + o for p, o in zip(parts, offsets)]).astype(np.int64),
            np.concatenate([p.lengths for p in parts]).astype(np.int64),
            np.concatenate([p.digests for p in parts]).astype(np.uint64),
            np.concatenate([p.origin + o for p, o in zip(parts, names)]).astype(np.int32),
            np.concatenate([p.lines for p in parts]).astype(np.int64),
            np.concatenate([p.origins for p in parts]),
        )

    @staticmethod
    def empty() -> "Examples":
        z = np.zeros(0, np.int64)
        return Examples(np.zeros(0, np.int32), np.zeros(0, bool), z, z, np.zeros(0, np.uint64), np.zeros(0, np.int32), z,
                        np.zeros(0, str))

    def save(self, path: str) -> None:
        """Write atomically (tmp file + rename) so a killed run never leaves a half cache file."""
        buf = io.BytesIO()
        np.savez(buf, **dataclasses.asdict(self))
        write_whole(path, buf.getvalue())

    @staticmethod
    def load(path: str) -> "Examples":
        with np.load(path, allow_pickle=False) as z:
            return Examples(**{f.name: z[f.name] for f in dataclasses.fields(Examples)})
