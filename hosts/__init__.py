"""Managed hosts, the commands run on them and their package operations."""
