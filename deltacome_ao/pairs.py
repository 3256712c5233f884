"""Moved to `deltacome_ao.evaluation.pairs`; this path stays importable (and runnable) for one release."""

import sys as _sys

from .evaluation import pairs as _moved

if __name__ == "__main__":
    _moved.main()
else:
    _sys.modules[__name__] = _moved
