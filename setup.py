"""Packaging entry point. Metadata lives in pyproject.toml; this file exists for the native extension
(a CMake build of flowrl_kernels._C, added by the native-extension work)."""
from setuptools import setup

setup()
