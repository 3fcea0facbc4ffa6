"""Rewards the GRPO tests name as `grpo_rewards:NAME` (tests/ is on the path): plain functions of the text, so a
test recomputes them by hand, and one that raises."""


def chars(prompt: str, completion: str, example: dict) -> float:
    """A reward that varies between the tiny model's random completions: their length in characters mod 5."""
    return (len(completion) % 5) / 4.0


def vowels(prompt: str, completion: str, example: dict) -> float:
    """The share of the completion's characters that are vowels."""
    return sum(ch in "aeiouAEIOU" for ch in completion) / max(len(completion), 1)


def boom(prompt: str, completion: str, example: dict) -> float:
    """Raises on every completion (the error path)."""
    raise ZeroDivisionError("the reward's own bug")


def parity(prompt: str, completion: str, example: dict) -> float:
    """1 for an even number of characters: a coarse reward, so some groups score all alike."""
    return float(len(completion) % 2 == 0)
