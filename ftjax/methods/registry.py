"""`config.method` -> the method object; a test or a recipe may register its own."""

from __future__ import annotations

from typing import Any, Callable

from ftjax import config as config_lib
from ftjax.methods.full import Full
from ftjax.methods.lora import Lora, LoraSpec
from ftjax.methods.method import Method

METHODS: dict[str, Callable[[LoraSpec], Method]] = {"lora": Lora, "full": Full}


def register_method(name: str, factory: Callable[[LoraSpec], Method]) -> None:
    """Make `method=name` build `factory(lora spec)` (and pass config validation)."""
    METHODS[name] = factory
    config_lib.allow_choice("method", name)


def lora_spec(lora: Any) -> LoraSpec:
    """The run config's `lora.*` group as a LoraSpec."""
    targets = lora.targets if isinstance(lora.targets, str) else tuple(lora.targets)
    return LoraSpec(int(lora.rank), float(lora.alpha), targets, float(lora.dropout), bool(lora.rslora))


def method_for(name: str, lora: Any) -> Method:
    """The method named `name` (`config.method`) for the `lora.*` group; an unknown name: the closest one."""
    if name not in METHODS:
        raise config_lib.ConfigError(config_lib.choice_message("method", name, tuple(METHODS)))
    return METHODS[name](lora if isinstance(lora, LoraSpec) else lora_spec(lora))
