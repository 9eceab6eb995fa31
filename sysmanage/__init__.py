"""The SysManage server: settings, ASGI entry point, and the live protocol core."""
