"""Which processes listen on which local TCP ports, read from /proc (Linux): /proc/net/tcp
gives each listening socket's port and inode, a process's fd table names the inode."""

from __future__ import annotations

import os
from pathlib import Path

from esp_serve.app.bench_overhead import descendants

TCP_LISTEN = "0A"


def _listening_inodes() -> dict[str, int]:
    """inode -> port of every listening TCP socket (IPv4 and IPv6, any address)."""
    ports = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == TCP_LISTEN:
                ports[inode] = int(local.rsplit(":", 1)[1], 16)
    return ports


def listeners(under: int | None = None) -> dict[int, list[str]]:
    """port -> command lines of the processes holding a socket that listens on it; with
    `under`, only processes descended from that pid (this test session's own Ray cluster,
    not a server that runs beside it)."""
    port_of = {f"socket:[{inode}]": port for inode, port in _listening_inodes().items()}
    found: dict[int, list[str]] = {}
    pids = map(str, descendants(under)) if under is not None else filter(str.isdigit, os.listdir("/proc"))
    for pid in pids:
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone, or not ours to read
            continue
        for port in {port_of[link] for link in links if link in port_of}:
            found.setdefault(port, []).append(cmdline)
    return found
