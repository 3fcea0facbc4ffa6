"""Early stopping on the eval loss: stop after `patience` evals in a row without a new best.

Its state travels in the checkpoint's metadata, so a resumed run stops where a straight run would.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class EarlyStop:
    patience: int  # evals without improvement before stopping; 0 = never stop
    best: float = math.inf
    since_best: int = 0

    def update(self, eval_loss: float) -> bool:
        """Record one eval loss; True when training should stop now."""
        if eval_loss < self.best:
            self.best, self.since_best = eval_loss, 0
        else:
            self.since_best += 1
        return self.patience > 0 and self.since_best >= self.patience

    def state(self) -> dict:
        return {"best": None if math.isinf(self.best) else self.best, "since_best": self.since_best}

    @classmethod
    def from_state(cls, patience: int, state: dict | None) -> "EarlyStop":
        """The tracker as saved in a checkpoint (fresh when the checkpoint predates early stopping)."""
        state = state or {}
        best = state.get("best")
        return cls(patience, math.inf if best is None else float(best), int(state.get("since_best", 0)))
