"""Training objectives, one module each (sft, preference, distill), and the registry `config.objective` reads.

An objective (`objective.Objective`) says what a run needs of it: its data, its batch source, its loss terms, the
reference it compares with, its held-out metric and report rows. `register_objective` adds one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from ftjax import config as config_lib
from ftjax.errors import ConfigError
from ftjax.objectives.distill import Distill
from ftjax.objectives.objective import MemoryShapes, Objective, Reference, ReportRows, TermSpec
from ftjax.objectives.preference import Preference
from ftjax.objectives.sft import Sft
from ftjax.objectives.sources import BatchSource, DatasetBatches

OBJECTIVES: dict[str, Callable[[Any], Objective]] = {
    "sft": Sft, **{name: functools.partial(Preference, name) for name in ("dpo", "ipo", "orpo", "simpo")},
    "distill": Distill}
SETTINGS: dict[str, str] = {name: "distill" if name == "distill" else "pref" for name in OBJECTIVES}  # objective -> the config group it is built from


def register_objective(name: str, factory: Callable[[Any], Objective], settings: str = "pref") -> None:
    """Make `objective=name` build `factory(<settings> group)` (and pass config validation)."""
    OBJECTIVES[name] = factory
    SETTINGS[name] = settings
    config_lib.allow_choice("objective", name)


def _known(name: str) -> None:
    if name not in OBJECTIVES:
        raise ConfigError(config_lib.choice_message("objective", name, tuple(OBJECTIVES)))


from ftjax.objectives.grpo import Grpo  # noqa: E402 - registers itself below, with the registry defined

register_objective("grpo", Grpo, settings="rl")


def objective_settings(name: str) -> str:
    """The config group (`pref`, `rl`, ...) the objective named `name` is built from; an unknown name: the closest."""
    _known(name)
    return SETTINGS[name]


def objective_for(name: str, settings: Any) -> Objective:
    """The objective named `name` (`config.objective`) built from its settings group (`objective_settings`)."""
    _known(name)
    return OBJECTIVES[name](settings)


__all__ = ["BatchSource", "DatasetBatches", "MemoryShapes", "OBJECTIVES", "Objective", "Reference", "ReportRows", "TermSpec",
           "objective_for", "objective_settings", "register_objective"]
