"""Run any test module as if every store were on NFS, with the rollback journal opted in:

    PYTHONPATH=tests/journal_mode SESSIONDB_UNSAFE_FILESYSTEM=journal pytest tests/...

Python imports ``sitecustomize`` at startup in every process started with that
``PYTHONPATH``: the test runner, its xdist workers and every spawned worker, so all of
them open their stores in rollback-journal mode, as the processes of a real deployment
on NFS would. Tests about the WAL itself (its file, checkpoints, the WAL bound) fail
there by design.
"""

import os
import sys

if os.environ.get("SESSIONDB_UNSAFE_FILESYSTEM") == "journal":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fakefs

    fakefs.install()
