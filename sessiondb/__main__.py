"""``python -m sessiondb``: the command line, see :mod:`sessiondb.cli`."""
from sessiondb.cli import main
raise SystemExit(main())
