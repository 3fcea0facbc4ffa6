"""Training objectives, one module each (sft, preference), and the registry `config.objective` reads.

An objective (`objective.Objective`) says what a run needs of it: its data, its batch source, its loss terms, the
reference it compares with, its held-out metric and report rows. `register_objective` adds one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from ftjax import config as config_lib
from ftjax.errors import ConfigError
from ftjax.objectives.objective import MemoryShapes, Objective, Reference, ReportRows, TermSpec
from ftjax.objectives.preference import Preference
from ftjax.objectives.sft import Sft
from ftjax.objectives.sources import BatchSource, DatasetBatches

OBJECTIVES: dict[str, Callable[[Any], Objective]] = {
    "sft": Sft, **{name: functools.partial(Preference, name) for name in ("dpo", "ipo", "orpo", "simpo")}}


def register_objective(name: str, factory: Callable[[Any], Objective]) -> None:
    """Make `objective=name` build `factory(pref group)` (and pass config validation)."""
    OBJECTIVES[name] = factory
    config_lib.allow_choice("objective", name)


def objective_for(name: str, pref: Any) -> Objective:
    """The objective named `name` (`config.objective`) with the run's `pref.*`; an unknown name: the closest."""
    if name not in OBJECTIVES:
        raise ConfigError(config_lib.choice_message("objective", name, tuple(OBJECTIVES)))
    return OBJECTIVES[name](pref)


__all__ = ["BatchSource", "DatasetBatches", "MemoryShapes", "OBJECTIVES", "Objective", "Reference", "ReportRows", "TermSpec",
           "objective_for", "register_objective"]
