"""The PostgreSQL backend (``sessiondb[postgres]``): imported only for a ``postgresql://``
URL, see :mod:`sessiondb.backend`."""
