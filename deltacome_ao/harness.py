"""Moved to `deltacome_ao.evaluation.harness`; this path stays importable for one release."""

import sys as _sys

from .evaluation import harness as _moved

_sys.modules[__name__] = _moved
