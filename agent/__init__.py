"""SysManage agent: connects a managed host to the SysManage server.

The agent reports the host's facts and live metrics, runs shell commands and package
operations the server asks for, and keeps every result on disk until the server
acknowledges it.  Run it with ``python -m agent``.
"""

__version__ = "0.1.0"
