"""Alerts raised about hosts, and their life cycle."""
