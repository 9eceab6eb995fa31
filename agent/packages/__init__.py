"""Package operations: detecting the package manager and installing, removing, updating."""
