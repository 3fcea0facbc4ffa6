"""Multi-host start-up: a rendezvous on the coordinator's port that names any process that does not join.

JAX's own start-up ends a process with a C++ fatal error that names nobody when a peer is missing.
So before the port is handed to `jax.distributed.initialize`, process 0 listens on it and every
other process says hello with its id and the process count; when all have, process 0 answers `go`
and each goes on to JAX's start-up. Otherwise every process stops with one line saying who is
missing (or that the coordinator never answered).
"""

from __future__ import annotations

import socket
import time

from ftjax.errors import StartupError

_HELLO = "ftjax-join"
_GRACE_S = 5.0  # after connecting, how much longer than the time-out a joiner waits for process 0's answer


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise StartupError(f"--coordinator_address={address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def rendezvous(address: str, num_processes: int, process_id: int, timeout_s: float) -> None:
    """Return once all `num_processes` processes are here; StartupError naming the missing ones otherwise."""
    if not 0 <= process_id < num_processes:
        raise StartupError(f"--process_id={process_id} is not in [0, {num_processes}) (--num_processes={num_processes})")
    if num_processes == 1:
        return
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    if process_id == 0:
        _lead(port, num_processes, deadline, timeout_s, address)
    else:
        _join(host, port, num_processes, process_id, timeout_s, address)


def _readline(conn: socket.socket, timeout_s: float) -> str:
    """One '\\n'-terminated line ('' if the peer closed or went quiet)."""
    conn.settimeout(max(timeout_s, 0.01))
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = conn.recv(512)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data.decode(errors="replace").strip()


def _listen(port: int) -> socket.socket:
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))
    except OSError as e:
        raise StartupError(f"process 0 cannot listen on the coordinator port {port}: {e.strerror or e}; "
                           "pick a free port in --coordinator_address") from None


def _lead(port: int, n: int, deadline: float, timeout_s: float, address: str) -> None:
    """Process 0: accept a hello from each of processes 1..n-1, then answer them all."""
    server = _listen(port)
    joined: dict[int, socket.socket] = {}
    try:
        while len(joined) < n - 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [i for i in range(1, n) if i not in joined]
                names = ", ".join(map(str, missing))
                _fail(joined, f"process{'es' if len(missing) > 1 else ''} {names} of {n} did not join within "
                              f"{timeout_s:g} s (coordinator {address}); check that every process was started "
                              "with the same --coordinator_address and --num_processes and its own --process_id")
            server.settimeout(min(remaining, 1.0))
            try:
                conn, _ = server.accept()
            except (TimeoutError, socket.timeout):
                continue
            words = _readline(conn, min(5.0, max(deadline - time.monotonic(), 0.5))).split()
            if len(words) != 3 or words[0] != _HELLO or not (words[1].isdigit() and words[2].isdigit()):
                conn.close()  # not one of ours (a port scanner, a stale client): ignore it
                continue
            pid, count = int(words[1]), int(words[2])
            if count != n:
                joined[-1] = conn
                _fail(joined, f"process {pid} was started with --num_processes={count}, process 0 with {n}")
            if pid in joined or not 0 < pid < n:
                joined[-1] = conn
                _fail(joined, f"two processes were started with --process_id={pid}" if pid in joined
                      else f"a process was started with --process_id={pid}, outside [0, {n})")
            joined[pid] = conn
        for conn in joined.values():
            conn.sendall(b"go\n")
        for conn in joined.values():  # let the peers close first, so no TIME_WAIT holds JAX's port here
            _readline(conn, 5.0)
    finally:
        for conn in joined.values():
            conn.close()
        server.close()


def _fail(joined: dict[int, socket.socket], message: str) -> None:
    """Tell every process that is waiting why the run cannot start, then stop this one."""
    for conn in joined.values():
        try:
            conn.sendall(f"error {message}\n".encode())
        except OSError:
            pass
    raise StartupError(message)


def _join(host: str, port: int, n: int, process_id: int, timeout_s: float, address: str) -> None:
    """Processes 1..n-1: reach process 0 (retrying until the time-out), say hello, wait for its answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=min(5.0, max(deadline - time.monotonic(), 0.1)))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise StartupError(f"process 0 (the coordinator at {address}) did not answer process {process_id} "
                                   f"within {timeout_s:g} s; check that it is running and reachable") from None
            time.sleep(0.2)
    with conn:
        conn.sendall(f"{_HELLO} {process_id} {n}\n".encode())
        # Process 0 answers by its own deadline, which is at most timeout_s after it began listening.
        answer = _readline(conn, timeout_s + _GRACE_S)
    if answer == "go":
        return
    if answer.startswith("error "):
        raise StartupError(answer[len("error "):])
    raise StartupError(f"process 0 (the coordinator at {address}) stopped before the run could start; see its log")
