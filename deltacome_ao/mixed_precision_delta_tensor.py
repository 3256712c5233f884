"""Moved to `deltacome_ao.methods.mixed_precision`; this path stays importable for one release."""

import sys as _sys

from .methods import mixed_precision as _moved

_sys.modules[__name__] = _moved
