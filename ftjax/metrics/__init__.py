"""Honest numbers and the run's records, one idea a module: `flops` (the FLOP model), `peaks` (peak FLOP/s
per device), `cpu_peak` (the measured CPU matmul peak), `writer` (metrics.jsonl + TensorBoard), `plot` (loss.png),
`step_clock` (training time for tokens/s and MFU)."""
