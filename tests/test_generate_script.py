"""scripts/generate.py as a user meets it: the interactive loop prompts, says how to leave, keeps the
conversation, and replies what `generate` replies; README prompts for the demo task use its instruction."""

import re
import subprocess
import sys

import pytest

from ftjax.tasks import person_json
from hf_helpers import tiny_hf, tiny_tokenizer
from loop_helpers import ROOT, load_config, script_env


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_interactive_chat_prompts_explains_leaving_and_replies_as_generate(tmp_path):
    import ftjax
    from ftjax.generate import generate

    folder = tmp_path / "tiny"
    tiny_hf("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    proc = subprocess.run([sys.executable, "scripts/generate.py", f"--model={folder}", "--interactive",
                           "--max_new_tokens=5"], input="w1 w2\\\nw3\nw4\n/exit\nnever read\n",
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "/exit or Ctrl-D leaves" in out and out.count("you> ") == 3 and "...> " in out
    replies = re.findall(r"assistant> (.*)", out)
    model, tokenizer = ftjax.load_model(folder), ftjax.load_tokenizer(folder)
    first = generate(model, tokenizer, [{"role": "user", "content": "w1 w2\nw3"}], max_new_tokens=5)
    second = generate(model, tokenizer, [{"role": "user", "content": "w1 w2\nw3"},
                                         {"role": "assistant", "content": first},
                                         {"role": "user", "content": "w4"}], max_new_tokens=5)
    assert replies == [first, second]


def _readme_prompts() -> list[str]:
    """Every --prompt="..." in the README's and BUILD.md's commands (a prompt may span lines)."""
    text = "".join((ROOT / name).read_text() for name in ("README.md", "BUILD.md"))
    return re.findall(r'--prompt="([^"]*)"', text)


def test_readme_demo_prompts_are_the_task_instruction_and_one_of_its_sentences():
    demo = [p for p in _readme_prompts() if "Extract" in p or "JSON" in p]
    assert demo, "the README shows at least one demo-task prompt"
    sentences = [re.escape(t).replace(r"\{", "{").replace(r"\}", "}") for t in person_json.TEMPLATES]
    patterns = [re.sub(r"\{\w+\}", r".+", s) for s in sentences]
    for prompt in demo:
        instruction, _, sentence = prompt.partition("\n")
        assert instruction == person_json.INSTRUCTION
        assert any(re.fullmatch(p, sentence) for p in patterns), sentence


def _demo_chat_line(workdir) -> list[str]:
    """bin/demo's printed "chat with it:" command, with this interpreter for the venv's and WORKDIR filled in."""
    line = next(ln for ln in (ROOT / "bin" / "demo").read_text().splitlines() if "chat with it:" in ln)
    command = line.split("chat with it:", 1)[1].split("(")[0].strip()
    argv = command.replace("$WORKDIR", str(workdir)).split()
    assert argv[0] == "$VENV/bin/python", line
    return [sys.executable, *argv[1:]]


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_the_demos_chat_line_chats_with_the_trained_workdir(tmp_path):
    """The command bin/demo prints, fed a message on stdin, replies as the workdir's model does."""
    import ftjax
    from ftjax.generate import generate
    from ftjax.train.loop import run

    c = load_config()
    c.train.steps, c.eval.final, c.checkpoint.every = 1, False, 1
    run(c, tmp_path / "run")
    proc = subprocess.run([*_demo_chat_line(tmp_path / "run"), "--max_new_tokens=5"], input="w1 w2\n",
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "/exit or Ctrl-D leaves" in proc.stdout
    model, tokenizer = ftjax.load_model(tmp_path / "run"), ftjax.load_tokenizer(tmp_path / "run")
    expected = generate(model, tokenizer, [{"role": "user", "content": "w1 w2"}], max_new_tokens=5)
    assert proc.stdout.count("assistant> ") == 1 and f"assistant> {expected}\n" in proc.stdout
