"""What a user reads: every flag a script defines is documented in README.md or BUILD.md; the README holds no
commit hash (its measurement history is in benchmarks/RESULTS.md)."""

from __future__ import annotations

import re

from loop_helpers import ROOT

FLAG_FILES = sorted((ROOT / "scripts").glob("*.py")) + [ROOT / "ftjax" / "cli.py"]


def _defined_flags() -> dict[str, str]:
    """flag name -> the file defining it (absl's DEFINE_* and config_flags.DEFINE_config_file)."""
    out = {}
    for path in FLAG_FILES:
        for name in re.findall(r'DEFINE_\w+\(\s*"(\w+)"', path.read_text()):
            out[name] = path.name
    return out


def test_every_script_flag_is_in_the_readme_or_build_md():
    docs = (ROOT / "README.md").read_text() + (ROOT / "BUILD.md").read_text()
    flags = _defined_flags()
    assert {"workdir", "prompt", "interactive", "stop_exit_code"} <= set(flags)  # the scan sees the scripts
    missing = [f"{where}: --{name}" for name, where in flags.items() if f"--{name}" not in docs]
    assert not missing, missing


def test_the_readme_holds_no_commit_hash():
    """The README is for the person deciding whether and how to use ftjax: measurement history, with its
    commits, is in benchmarks/RESULTS.md. A hex word of 7-40 characters with a digit and a letter is a hash."""
    words = re.findall(r"(?<![\w/.-])[0-9a-f]{7,40}(?![\w/-])", (ROOT / "README.md").read_text())
    hashes = [w for w in words if re.search(r"\d", w) and re.search(r"[a-f]", w)]
    assert not hashes, hashes
