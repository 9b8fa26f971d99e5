"""Drop-in facades for the APIs sessiondb descends from; see :mod:`sessiondb.compat.hermes`."""
