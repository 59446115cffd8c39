"""Throwaway servers for tests: moved to :mod:`streambus.testing.servers`, re-exported here."""

from streambus.testing.servers import ServerProcess, free_port, server_binaries

__all__ = ["ServerProcess", "free_port", "server_binaries"]
