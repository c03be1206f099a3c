"""Named FlowRL presets: the option values that reproduce each source of the algorithm (docs/flowrl.md).

A preset is a plain dict ``{"section.key": value}`` of trainer config fields. ``algo.preset = "authors"``
(TOML or ``--algo.preset=authors``) fills those fields; any of them set explicitly in the TOML file or on
the command line wins over the preset, one field at a time (``flowrl.config.build``). The run's
config.toml holds the resolved values. Only the fields on which the sources differ are listed; every
other option (beta = 15, the 3-layer log Z MLP, dropout 0.1, the length-normalized residual) is the same
in all three.

    paper        the paper's objective: sequence ratio (token sum) clipped to [0.8, 1.2]; an empty response
                 weighs 0; log Z pooled over every prompt token; log Z in its own AdamW group (logz.lr,
                 no weight decay).
    authors      the authors' fork of verl 0.4 (Xuekai-Zhu/FlowRL, verl@FlowRL/verl/workers/actor/dp_actor.py):
                 the RAW sequence ratio (it computes a clipped one and does not use it); an empty response
                 adds log Z^2; the last prompt token left out of the pooling; log Z in the policy's
                 optimizer group (the policy's lr and weight decay: 1e-6 and 0.1 in their 7B script).
    verl-recipe  the later verl recipe (recipe/flowrl/flowrl_actor.py): as ``authors`` but the ratio is
                 clamped at 10 with no lower bound.

Other trainers (the TRL one) read the same table: ``loss_options(name)`` gives flowrl_loss's keyword
arguments, ``PRESETS[name]`` the rest. Importing this module imports nothing heavy (no torch).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

DEFAULT_PRESET = "paper"

# field -> value; a negative clip bound means "no bound" (flowrl.algorithms.clip_bounds)
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {
        "algo.importance": "sequence",
        "algo.clip": [0.8, 1.2],
        "algo.empty": "zero",
        "logz.include_last_token": True,
        "logz.param_group": "own",
    },
    "authors": {
        "algo.importance": "sequence",
        "algo.clip": [-1.0, -1.0],
        "algo.empty": "logz",
        "logz.include_last_token": False,
        "logz.param_group": "policy",
    },
    "verl-recipe": {
        "algo.importance": "sequence",
        "algo.clip": [-1.0, 10.0],
        "algo.empty": "logz",
        "logz.include_last_token": False,
        "logz.param_group": "policy",
    },
}

# the fields every preset sets (the same keys in each, so switching presets never leaves one stale)
PRESET_FIELDS = tuple(PRESETS[DEFAULT_PRESET])
assert all(tuple(p) == PRESET_FIELDS for p in PRESETS.values())


def check_preset(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown FlowRL preset {name!r}; use one of {sorted(PRESETS)} (docs/flowrl.md).")


def clip_tuple(clip) -> Tuple[Optional[float], Optional[float]]:
    """Config [lo, hi] with negative = no bound -> the (lo, hi) tuple flowrl_loss takes (None = no bound)."""
    lo, hi = clip
    return (None if lo < 0 else float(lo), None if hi < 0 else float(hi))


def loss_options(name: str = DEFAULT_PRESET, **overrides: Any) -> Dict[str, Any]:
    """flowrl_kernels.flowrl_loss keyword arguments of a preset: {importance, clip, empty}.

    ``overrides`` replace single options (importance=..., clip=[lo, hi] in config form, empty=...)."""
    check_preset(name)
    p = PRESETS[name]
    opts = {"importance": p["algo.importance"], "clip": p["algo.clip"], "empty": p["algo.empty"]}
    unknown = set(overrides) - set(opts)
    if unknown:
        raise ValueError(f"loss_options: unknown option(s) {sorted(unknown)}; known: {sorted(opts)}.")
    opts.update(overrides)
    opts["clip"] = clip_tuple(opts["clip"])
    return opts
