"""Hard deadlines for delivery attempts: at the deadline, the attempt's sockets are shut down.

Socket timeouts bound each read, not an attempt: a receiver that trickles one byte
a second keeps every read short and the attempt alive for as long as it likes. So
an attempt runs inside `with Deadline(seconds) as deadline:`, code that opens or
reuses a socket registers it with `deadline.watch(sock)`, and one watchdog thread
per process shuts the registered sockets down when the time is up. A blocked
`recv`, `send` or TLS handshake then fails at once, and the caller, seeing
`deadline.expired`, reports a timeout. `active()` finds the thread's deadline for
code far below the `with` (a connection class inside the HTTP client, say).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import ssl
import threading
import time
from types import TracebackType

_local = threading.local()
#: How late the watchdog may act: it wakes once for every deadline falling due within this much,
#: instead of once per attempt (a thousand wake-ups a second at full speed).
SLACK = 0.05


class Deadline:
    """A moment by which an attempt must be over; `watch`ed sockets are shut down then."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self._lock = threading.Lock()
        #: Duplicates of the watched sockets' descriptors: shutting one down ends I/O on the
        #: original too, whatever object (plain or TLS socket) holds it now, and closing ours
        #: never closes theirs.
        self._watched: list[socket.socket] = []
        self._owned: set[int] = set()  # ids of the duplicates among them, ours to close
        self._expired = False
        self._done = False
        self._previous: Deadline | None = None

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self.at

    def remaining(self) -> float:
        """Seconds left, never below zero."""
        return max(0.0, self.at - time.monotonic())

    def watch(self, sock: socket.socket, *, duplicate: bool = True) -> None:
        """Shut `sock` down at the deadline (at once if it has passed); a closed socket is ignored.

        `duplicate=False` watches the socket object itself, saving two system calls: right for a
        socket that keeps its object for the whole attempt (a kept-alive connection), not for one
        about to be wrapped in TLS, which takes its descriptor away. (A closed socket object has
        no descriptor left, so shutting it down never touches another socket's.)
        """
        # (A TLS socket's own shutdown() also drops its TLS state under the reading thread.)
        if not duplicate and not isinstance(sock, ssl.SSLSocket):
            with self._lock:
                if not self._done and not self._expired:
                    self._watched.append(sock)
                    return
            if self._expired:
                _shutdown(sock)
            return
        try:
            duplicate_sock = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return  # already closed: nothing left to interrupt
        self._watch_duplicate(duplicate_sock)

    def _watch_duplicate(self, duplicate: socket.socket) -> None:
        with self._lock:
            if not self._done and not self._expired:
                self._watched.append(duplicate)
                self._owned.add(id(duplicate))
                duplicate = None  # type: ignore[assignment]
        if duplicate is not None:  # the deadline has passed or the attempt is over
            if self._expired:
                _shutdown(duplicate)
            duplicate.close()

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._expired = True
            watched, self._watched = self._watched, []
            owned, self._owned = self._owned, set()
        for sock in watched:
            _shutdown(sock)
            if id(sock) in owned:
                sock.close()

    def close(self) -> None:
        """The attempt is over: forget the sockets (they stay open for reuse) and disarm."""
        with self._lock:
            self._done = True
            watched, self._watched = self._watched, []
            owned, self._owned = self._owned, set()
        for sock in watched:
            if id(sock) in owned:
                sock.close()

    def __enter__(self) -> Deadline:
        self._previous = getattr(_local, "deadline", None)
        _local.deadline = self
        _watchdog.arm(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _local.deadline = self._previous
        self.close()


def active() -> Deadline | None:
    """The deadline of the attempt running on this thread, if any."""
    return getattr(_local, "deadline", None)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One thread for every deadline of the process: a heap ordered by when each is due."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def arm(self, deadline: Deadline) -> None:
        with self._wake:
            if self._thread is None or self._pid != os.getpid():  # none yet, or a forked child
                self._heap = []
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="dispatcher-deadlines", daemon=True)
                self._thread.start()
            first = not self._heap or deadline.at < self._heap[0][0]
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if first:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._wake.wait(None if not self._heap else self._heap[0][0] - time.monotonic() + SLACK)
                due = []
                while self._heap and self._heap[0][0] <= time.monotonic():
                    due.append(heapq.heappop(self._heap)[2])
            for deadline in due:
                deadline._expire()  # a no-op when its attempt is already over


_watchdog = _Watchdog()
