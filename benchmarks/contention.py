"""Run the contention benchmark from a checkout: ``python -m benchmarks.contention --quick``.

The implementation ships inside the package (:mod:`sessiondb.bench`) so that an installed
``sessiondb bench`` runs the same code.
"""

import sys

from sessiondb.bench import main

if __name__ == "__main__":
    sys.exit(main())
