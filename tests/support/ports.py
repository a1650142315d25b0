"""Free loopback ports for the servers tests start."""

import socket


def free_port() -> int:
    """A port nothing listens on once this returns (the probe socket is closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
