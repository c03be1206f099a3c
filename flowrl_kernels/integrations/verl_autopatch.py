"""Importing this module patches verl (see flowrl_kernels.integrations.verl).

verl imports every module named in the env var ``VERL_USE_EXTERNAL_MODULES`` (comma-separated) when
``verl`` itself is imported, in the driver and in each Ray worker, so
``VERL_USE_EXTERNAL_MODULES=flowrl_kernels.integrations.verl_autopatch`` patches all processes.
"""
from .verl import patch

patch()
