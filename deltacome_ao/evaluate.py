"""Moved to `deltacome_ao.evaluation.metrics`; this path stays importable for one release."""

import sys as _sys

from .evaluation import metrics as _moved

_sys.modules[__name__] = _moved
