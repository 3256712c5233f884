"""Moved to `deltacome_ao.evaluation.compare`; this path stays importable (and runnable) for one release."""

import sys as _sys

from .evaluation import compare as _moved

if __name__ == "__main__":
    _moved.main()
else:
    _sys.modules[__name__] = _moved
