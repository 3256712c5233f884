"""Registers `optimum-cli deltacome` (optimum loads every module of this namespace package)."""

from deltacome_ao.optimum import REGISTER_COMMANDS  # noqa: F401
