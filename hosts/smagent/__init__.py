"""
Serving the unchanged SysManage agent: enrollment (``POST /api/host/register``,
approval, registration keys), connection tokens (``POST /api/agent/auth``), its
WebSocket (``/api/agent/connect``) and HTTP polling (``POST /api/agent/poll``)
transports, and the translation of its messages to and from the product's services.
See ``docs/sysmanage-agent.md``.
"""
