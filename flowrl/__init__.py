"""flowrl: a minimal FSDP2 trainer for FlowRL (arXiv 2509.15207) with GRPO as the baseline.

Entry point: ``flowrl/train.py`` (see its docstring). One module per concern: config, distributed,
model, rollout, tasks, algorithms, metrics.
"""
