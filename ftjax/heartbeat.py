"""A dead host is one line, fast: the processes of a multi-host run watch each other over one TCP connection
each to process 0, beside JAX's own coordination service.

A process that dies (kill -9, a crash, a lost machine) closes its connection at once; one that hangs stops
sending its beat. Within --heartbeat_timeout_s (default 20 s) every other process prints one line naming the
lost process and the last complete checkpoint, and exits with PeerLost's code (75) so that a scheduler
relaunches the same command, which resumes from that checkpoint. JAX's own detection (a C++ abort after its
heartbeat time-out) is set to a longer time so that this line comes first.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from typing import Callable

from ftjax import fault_log, workdir_lock
from ftjax.checkpoint_faults import last_complete
from ftjax.errors import PeerLost

_BEAT = b"beat\n"


class _Watch:
    conns: dict[int, socket.socket] = {}  # peer id -> connection (process 0: every other; others: process 0)
    hosts: dict[int, str] = {}
    done = threading.Event()
    n = 0
    timeout_s = 20.0


_W = _Watch()


def start(coordinator_host: str, num_processes: int, process_id: int, timeout_s: float,
          share_port: Callable[[int], int]) -> None:
    """Connect the processes (process 0 listens on a free port that `share_port` hands to the others) and watch
    them from a daemon thread until `stop()`."""
    _W.n, _W.timeout_s, _W.done = num_processes, float(timeout_s), threading.Event()
    server = None
    if process_id == 0:
        server = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True) \
            if socket.has_dualstack_ipv6() else socket.create_server(("", 0))
    port = share_port(server.getsockname()[1] if server else 0)
    if server is not None:
        server.settimeout(timeout_s)
        with server:
            for _ in range(num_processes - 1):
                conn, _ = server.accept()
                words = _readline(conn).split()
                _W.conns[int(words[0])], _W.hosts[int(words[0])] = conn, words[1]
        _W.hosts[0] = socket.gethostname()
    else:
        conn = socket.create_connection((coordinator_host, port), timeout=timeout_s)
        conn.sendall(f"{process_id} {socket.gethostname()}\n".encode())
        _W.conns[0], _W.hosts[0] = conn, coordinator_host
    threading.Thread(target=_watch, args=(process_id,), name="ftjax-peer-watch", daemon=True).start()


def stop() -> None:
    """This process ends cleanly: tell the others (so its exit is no loss) and stop watching."""
    if not _W.conns or _W.done.is_set():
        return
    _W.done.set()
    for conn in _W.conns.values():
        try:
            conn.sendall(b"bye\n")
        except OSError:
            pass


def grace(seconds: float = 5.0) -> None:
    """Called when this process fails: a peer's death often shows first as a failed collective (gloo's closed
    connection), before the watch has read the closed heartbeat. Give the watch that long to name the lost peer
    (it then ends the process with the one line); return if it finds none."""
    deadline = time.monotonic() + seconds
    while _W.conns and not _W.done.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)


def _readline(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _watch(process_id: int) -> None:
    """Beat every quarter time-out; read the peers' beats and news; a silence or a closed connection is a loss."""
    heard = {pid: time.monotonic() for pid in _W.conns}
    buffers = {pid: b"" for pid in _W.conns}
    ended: set[int] = set()
    last_beat = 0.0
    while not _W.done.is_set():
        now = time.monotonic()
        if now - last_beat >= _W.timeout_s / 4:
            last_beat = now
            for pid, conn in _W.conns.items():
                if pid not in ended:
                    try:
                        conn.sendall(_BEAT)
                    except OSError:
                        pass  # its closed end shows on the read side
        live = {conn: pid for pid, conn in _W.conns.items() if pid not in ended}
        readable, _, _ = select.select(list(live), [], [], 0.5)
        if _W.done.is_set():
            return
        for conn in readable:
            pid = live[conn]
            try:
                chunk = conn.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                _lost(process_id, pid, "its connection closed: killed or crashed")
            buffers[pid] += chunk
            heard[pid] = time.monotonic()
            *lines, buffers[pid] = buffers[pid].split(b"\n")
            for line in lines:
                words = line.decode(errors="replace").split()
                if words[:1] == ["bye"]:
                    ended.add(pid)
                    if pid == 0:
                        return  # process 0 ended cleanly: nothing left to watch
                elif words[:1] == ["lost"]:
                    _W.hosts[int(words[1])] = words[2]
                    _lost(process_id, int(words[1]), " ".join(words[3:]), tell=False)
        for pid, when in heard.items():
            if pid not in ended and time.monotonic() - when > _W.timeout_s:
                _lost(process_id, pid, f"no answer for {_W.timeout_s:g} s")


def _lost(process_id: int, pid: int, why: str, tell: bool = True) -> None:
    """Tell the others (process 0), print the one line, note the details, end this process (exit 75)."""
    if _W.done.is_set():
        return
    _W.done.set()
    host = _W.hosts.get(pid, "?")
    if tell and process_id == 0:
        for other, conn in _W.conns.items():
            if other != pid:
                try:
                    conn.sendall(f"lost {pid} {host} {why}\n".encode())
                except OSError:
                    pass
    workdir = workdir_lock.last_held()
    kept = last_complete(workdir) if workdir is not None else "this job saves nothing"
    log = fault_log.note(workdir, f"process {process_id}: process {pid} ({host}) of {_W.n} lost: {why}")
    details = f"; details in {log}" if log else ""
    error = PeerLost(f"process {pid} ({host}) of {_W.n} was lost ({why}); {kept}; relaunch the same command "
                     f"on every process to resume from it{details}")
    print(f"error: process {process_id}: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(error.exit_code)  # the main thread may be waiting in a collective that will never end
