"""The benchmarks: one module per measurement, run from the repository root as ``python -m benchmarks.<name>``.

``common`` holds what they share (machine description, process-tree memory sampler, measured subprocesses,
atomic result files through ``dali_lens.data.io``); ``legacy`` is the "before dali-lens" baseline (the
mechine_lensing-style multi-scale loader and training step) that the loader and memory benchmarks compare
against. See benchmarks/README.md for what each one measures and the committed results.
"""
