"""Deprecated alias of flowrl.experiments.flowrl_vs_grpo (the FlowRL-vs-GRPO experiment, renamed in issue 25
so that it is not confused with ``flowrl/diversity.py``, the answer-diversity metrics).

``python -m flowrl.experiments.diversity ...`` and ``from flowrl.experiments import diversity`` keep working:
the module warns once (DeprecationWarning), re-exports every public name it had (the same objects, now in
``flowrl_vs_grpo`` and ``flowrl_vs_grpo_report``) and runs ``main`` as a script. Use
``python -m flowrl.experiments.flowrl_vs_grpo``.
"""
import sys
import warnings

from flowrl import algorithms, config, distributed, diversity, model, rollout, tasks, train  # noqa: F401
from flowrl.experiments.flowrl_vs_grpo import (  # noqa: F401  (re-exports)
    CPU, MALFORMED, MALFORMED_FLOOR, METHODS, SUMMARY_KEYS, TRAIN_KEYS, DigitSumTask, answer_distributions,
    build_policy, digit_weights, exact_metrics, make_config, main, parse_args, pretrain, rl_step, run_countdown,
    run_tiny, sampled_metrics, train_means)
from flowrl.experiments.flowrl_vs_grpo_report import (  # noqa: F401  (re-exports)
    COLORS, LINESTYLES, contrasts, final, fmt, histogram, label, load_runs, paired, parse_schedule, plot,
    plot_schedules, schedule_of, t_quantile, table)

# run as a script (python -m), this module is __main__: point the warning at it so the default filter shows it
warnings.warn("flowrl.experiments.diversity is a deprecated alias of flowrl.experiments.flowrl_vs_grpo "
              "(python -m flowrl.experiments.flowrl_vs_grpo); the metrics module is flowrl.diversity.",
              DeprecationWarning, stacklevel=1 if __name__ == "__main__" else 2)

if __name__ == "__main__":
    main(sys.argv[1:])
