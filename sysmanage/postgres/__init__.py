"""The PostgreSQL backend of the server (``ENGINE: "sysmanage.postgres"``): Django's,
behind the process's :class:`~sysmanage.dbgate.DatabaseGate`."""
