"""The fine-tuning method of a run as one object: what trains, what a checkpoint holds, what an export
writes, what the step-0 reference costs and the FLOP formula. `method_for(name, lora)` picks it by
`config.method`; `register_method` adds one (a test's toy method)."""

from ftjax.methods.full import Full
from ftjax.methods.lora import Lora, LoraSpec
from ftjax.methods.method import Method
from ftjax.methods.registry import METHODS, method_for, register_method

__all__ = ["Full", "Lora", "LoraSpec", "METHODS", "Method", "method_for", "register_method"]
