"""Training objectives: what a run optimizes, and the math each needs (GRPO loss, advantages and rewards;
distillation divergences)."""
