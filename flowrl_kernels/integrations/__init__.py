"""Drop-in routes from other RL trainers' log-prob helpers to flowrl_kernels ops.

One module per trainer, each with ``patch()`` / ``unpatch()`` / ``patched()`` (a context manager) /
``is_patched()``; all targets of a trainer are patched together or not at all (``PatchError`` says
why). The trainers themselves are imported only when you import their module here.

    import flowrl_kernels.integrations.trl as fk_trl;  fk_trl.patch()
    import flowrl_kernels.integrations.verl as fk_verl;  fk_verl.patch()
    import flowrl_kernels.integrations.openrlhf as fk_orlhf;  fk_orlhf.patch()
"""
from ._patching import PatchError

__all__ = ["PatchError"]
