"""Training objectives: what a run optimizes and the pure math each one needs (GRPO's loss, advantages, rewards)."""
