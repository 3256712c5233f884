"""Moved to `deltacome_ao.methods.bitdelta`; this path stays importable for one release."""

import sys as _sys

from .methods import bitdelta as _moved

_sys.modules[__name__] = _moved
