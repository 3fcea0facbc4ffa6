"""ModelConfig is the shared fields plus one block per family feature: no family-specific field is read outside
its block's module (read with the AST, so a new family adds a block, not switches read all over)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from ftjax.models.gemma import GemmaConfig
from ftjax.models.llama import ModelConfig
from ftjax.models.moe import MoEConfig
from ftjax.models.phi import PhiConfig

ROOT = Path(__file__).resolve().parents[1]
# block -> (its module, the fields that are the family's own). MoE's shape (num_experts, top_k, intermediate_size)
# is costed like hidden_size (FLOPs, memory, weight layouts); its routing is MoE's own. `implementation` (the
# grouped matmul) shares its name with AttentionConfig's and is left to that module's own tests.
BLOCKS = {
    "gemma": (GemmaConfig, "ftjax/models/gemma.py", {f.name for f in dataclasses.fields(GemmaConfig)}),
    "phi": (PhiConfig, "ftjax/models/phi.py", {f.name for f in dataclasses.fields(PhiConfig)}),
    "moe": (MoEConfig, "ftjax/models/moe.py", {"norm_topk_prob", "router_aux_loss_coef"}),
}


def attribute_reads(path: Path, names: set[str], root: Path = ROOT) -> list[str]:
    """`file:line .name` for every attribute read (or getattr with a literal name) of one of `names`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in names:
            found.append(f"{path.relative_to(root)}:{node.lineno} .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in names):
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.func.id}({node.args[1].value!r})")
    return found


def test_model_config_is_shared_fields_plus_family_blocks():
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for name, (block, _, own) in BLOCKS.items():
        assert fields[name].default is None, f"{name}: a block is absent (None) for a model without the feature"
        assert own <= {f.name for f in dataclasses.fields(block)}
        assert not own & set(fields), f"ModelConfig repeats {name}'s fields {own & set(fields)} as switches"


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_no_family_field_is_read_outside_its_block_module(block):
    _, module, own = BLOCKS[block]
    reads = [r for p in sorted((ROOT / "ftjax").rglob("*.py")) if p != ROOT / module
             for r in attribute_reads(p, own)]
    assert reads == [], f"{block}'s fields are read outside {module}: {reads}"


def test_the_check_sees_a_read(tmp_path):
    """The AST walk finds a plain read and a getattr of a block field (so an empty result above means none)."""
    code = tmp_path / "ftjax" / "x.py"
    code.parent.mkdir()
    code.write_text("def f(cfg):\n    return cfg.gemma.attn_softcap, getattr(cfg, 'final_softcap', None)\n")
    assert attribute_reads(code, BLOCKS["gemma"][2], tmp_path) == ["ftjax/x.py:2 .attn_softcap",
                                                                   "ftjax/x.py:2 getattr('final_softcap')"]
