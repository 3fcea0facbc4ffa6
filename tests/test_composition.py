"""The run composed once, from parts that decide for themselves: no code outside an objective or a method module
asks which objective or method a run has by its name, no function below the composition step takes the run's
ConfigDict, and `auto` is resolved once per run. Read from the source's syntax trees, not grepped."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"objective", "method"}

# Where naming an objective or a method by its string is the point: their own modules, and the config's
# validation tables (ftjax/config.py: the choices and the keys that apply with some values only).
OWNERS = {"objective": ("ftjax/objectives/", "ftjax/config.py"), "method": ("ftjax/methods/", "ftjax/config.py")}


def _sources() -> list[Path]:
    return sorted([*(ROOT / "ftjax").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")])


def _named(node: ast.AST) -> set[str]:
    """Which of objective / method an expression names (a variable, attribute or parameter of that name)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id in NAMES:
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and n.attr in NAMES:
            out.add(n.attr)
    return out


def _strings(node: ast.AST) -> bool:
    """A string literal, or a tuple / list / set of them."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and bool(node.elts) and all(map(_strings, node.elts))


def _string_keyed(node: ast.AST, tables: set[str]) -> bool:
    """A dict literal keyed by strings, or a module-level name bound to one."""
    if isinstance(node, ast.Dict):
        return bool(node.keys) and all(k is not None and _strings(k) for k in node.keys)
    return isinstance(node, ast.Name) and node.id in tables


def string_tests(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, objective|method) of every comparison, membership test, `match` or string-keyed dict lookup that
    tests an expression naming objective / method against string literals."""
    tables = {t.id for node in tree.body if isinstance(node, ast.Assign) and _string_keyed(node.value, set())
              for t in node.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = set().union(*map(_named, sides))
            if named and any(_strings(s) for s in sides):
                found += [(node.lineno, n) for n in named]
        elif isinstance(node, ast.Match):
            literal = any(isinstance(p, ast.MatchValue) and _strings(p.value) for c in node.cases
                          for p in ast.walk(c.pattern))
            if literal:
                found += [(node.lineno, n) for n in _named(node.subject)]
        elif isinstance(node, ast.Subscript) and _string_keyed(node.value, tables):
            found += [(node.lineno, n) for n in _named(node.slice)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and _string_keyed(node.func.value, tables) and node.args):
            found += [(node.lineno, n) for n in _named(node.args[0])]
    return sorted(found)


def test_the_check_sees_each_way_of_asking_a_name():
    src = ("T = {'lora': 1}\n"
           "a = config.method == 'lora'\nb = c.objective in ('dpo', 'ipo')\nd = {'sft': 1}[objective]\n"
           "e = T[config.method]\nf = T.get(method)\n"
           "match config.objective:\n    case 'sft':\n        pass\n"
           "ok = config.method == other\nok2 = name == 'lora'\n")
    assert string_tests(ast.parse(src)) == [(2, "method"), (3, "objective"), (4, "objective"), (5, "method"),
                                            (6, "method"), (7, "objective")]


def test_no_code_asks_an_objective_or_a_method_by_its_name():
    offenders = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for line, name in string_tests(ast.parse(path.read_text())):
            if rel.startswith(OWNERS[name]):
                continue
            offenders.append(f"{rel}:{line} ({name})")
    assert offenders == []


# The composition step reads the ConfigDict; below it, functions take the parts they need. The entry points that
# compose a run first thing (the library forms of scripts/train.py and scripts/benchmark.py) and the workdir's
# reading of a recorded config.json take it too.
READS_THE_CONFIG = ("ftjax/config.py", "ftjax/backend_defaults.py", "ftjax/train/compose.py")
ENTRY_POINTS = ("ftjax/train/loop.py:run", "ftjax/benchmark.py:prepare", "ftjax/benchmark.py:run_benchmark",
                "ftjax/workdir.py:recorded", "ftjax/train/aot.py:compile_recipe")


def config_parameters(tree: ast.AST) -> list[str]:
    """Functions with a parameter named `config` or annotated as a ConfigDict."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
                note = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if arg.arg == "config" or "ConfigDict" in note:
                    out.append(node.name)
    return out


def test_no_function_below_the_composition_takes_the_run_config():
    takers = []
    for path in sorted((ROOT / "ftjax").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel not in READS_THE_CONFIG:
            takers += [f"{rel}:{name}" for name in config_parameters(ast.parse(path.read_text()))]
    assert [t for t in takers if t not in ENTRY_POINTS] == []


@pytest.mark.slow  # a training run (> 10 s here)
def test_auto_is_resolved_once_per_run_and_actions_see_every_step(tmp_path, monkeypatch):
    import sys

    from ftjax import backend_defaults
    from ftjax.train.loop import run
    from loop_helpers import load_config, metrics

    calls, original = [], backend_defaults.resolve_auto

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    for module in [m for name, m in sys.modules.items() if name.startswith("ftjax")]:
        if getattr(module, "resolve_auto", None) is original:
            monkeypatch.setattr(module, "resolve_auto", counted)
    seen = []
    c = load_config()
    c.train.steps, c.eval.final, c.checkpoint.every = 2, False, 0
    run(c, tmp_path, actions=[lambda tick: seen.append((tick.step, tick.is_last, tick.values.get("loss")))])
    assert len(calls) == 1
    assert seen == [(r["step"], r["step"] == 2, r["loss"]) for r in metrics(tmp_path)]
