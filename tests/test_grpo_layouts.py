"""objective=grpo's rollouts and losses do not depend on the process layout, and a kill -9 loses nothing: scripts/
train.py on 1 device, on 8 simulated devices, and as 2 processes x 4 devices (jax.distributed on 127.0.0.1, gloo)
samples the same completions (the same rewards, lengths and entropies) and logs the same losses to 1e-5; killed
mid-run and resumed, it logs bitwise the losses of a straight run, including a step that trains a rollout batch
sampled before the kill (rl.num_iterations = 2: the batch in hand travels in the checkpoint).
"""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest

from loop_helpers import ROOT, metrics, script_env
from test_multihost import _free_port, _jobs

pytestmark = pytest.mark.slow

STEPS = 4
RTOL = 1e-5  # ARCHITECTURE.md: the same loss to within float tolerance across process layouts
# the GRPO loss is a mean of per-token terms of the advantages' scale (~0.1-1) that cancel to ~1e-4: 1e-5 of that
# scale, absolute
ATOL = 1e-6
COMPARED = ("loss", "reward", "reward_std", "completion_length", "entropy", "kl", "clip_ratio", "frac_reward_zero_std")
FLAGS = ("--config.objective=grpo", "--config.rl.num_generations=4", "--config.rl.prompts_per_step=2",
         "--config.rl.max_new_tokens=8", "--config.rl.num_iterations=2", "--config.rl.beta=0.1",
         "--config.rl.epsilon=0.005", "--config.rl.rewards=grpo_rewards:chars,grpo_rewards:vowels=0.5",
         "--config.eval.final=False", f"--config.train.steps={STEPS}", "--config.checkpoint.every=1")


def _command(workdir, *flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), f"--config={ROOT / 'configs' / 'tiny_test.py'}",
            f"--workdir={workdir}", *FLAGS, *flags]


def _env(devices: int, fault: str = "") -> dict[str, str]:
    return script_env(devices, fault, TOKENIZERS_PARALLELISM="false", PYTHONPATH=f"{ROOT / 'tests'}:{ROOT}")


def _rows(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_layouts")
    port = _free_port()
    with _jobs(900) as (jobs, start):
        start("one", _command(root / "one"), _env(1), root)
        start("eight", _command(root / "eight"), _env(8), root)
        for i in range(2):
            start(f"p{i}", _command(root / "two", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                    f"--process_id={i}", "--heartbeat_timeout_s=120"), _env(4), root)  # a loaded CPU
    for job in jobs:
        assert job.proc.returncode == 0, job.tail()
    return root


@pytest.mark.parametrize("layout", ["eight", "two"])
def test_rollouts_and_losses_do_not_depend_on_the_layout(layouts, layout):
    one, other = _rows(layouts / "one"), _rows(layouts / layout)
    assert sorted(one) == sorted(other) == list(range(1, STEPS + 1))
    assert "reward" in one[1] and "reward" in one[3] and "reward" not in one[2]  # a rollout every 2 steps
    for step in one:
        for key in COMPARED:
            assert (key in one[step]) == (key in other[step]), (step, key)
            if key in one[step]:
                np.testing.assert_allclose(other[step][key], one[step][key], rtol=RTOL, atol=ATOL,
                                           err_msg=f"step {step} {key}")


def test_kill_9_then_resume_logs_the_straight_runs_losses_bitwise(layouts, tmp_path):
    straight = _rows(layouts / "one")

    def train(fault: str) -> subprocess.CompletedProcess:
        return subprocess.run(_command(tmp_path), env=_env(1, fault), capture_output=True, text=True, timeout=600)

    killed = train("kill@4")  # as step 4 ends; step 3's checkpoint holds the batch steps 3 and 4 train
    assert killed.returncode == -signal.SIGKILL
    resumed = train("")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 3" in resumed.stdout or "resumed from step 2" in resumed.stdout, resumed.stdout
    rows = _rows(tmp_path)
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step, row in rows.items():
        for key in COMPARED:
            assert row.get(key) == straight[step].get(key), (step, key, row.get(key), straight[step].get(key))
