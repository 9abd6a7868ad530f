"""A small TCP proxy on 127.0.0.1 between clients and Redis, for fault injection.

It forwards bytes both ways and can add latency to every chunk (``delay``), stop
forwarding without closing anything (``pause`` / ``resume``), close every open
connection at once (``cut``), and lose the next reply (``drop_next_reply``: the server has
run the command, the client never hears of it). Threads only; standard library only.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

HOST = "127.0.0.1"
CHUNK = 65536
POLL = 0.05  # how often a paused pump or the acceptor looks at the stop flag


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>`` with injectable faults."""

    def __init__(self, target_port: int, *, delay: float = 0.0) -> None:
        self.target_port = target_port
        self.delay = delay
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(128)
        self._listener.settimeout(POLL)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self.cuts = 0
        self._drop_reply = threading.Event()
        self._refuse_after_drop = False
        self._refusing = threading.Event()
        self.dropped = threading.Event()  # set once an armed reply was dropped

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def start(self) -> FaultProxy:
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._refusing.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=5.0)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(POLL)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [client, upstream]
                self.accepted += 1
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool = False) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    data = src.recv(CHUNK)
                except TimeoutError:
                    continue
                if not data or self._refusing.is_set():
                    break
                if replies and self._drop_reply.is_set():
                    self._drop_reply.clear()
                    if self._refuse_after_drop:
                        self._refusing.set()
                    self.dropped.set()
                    break  # the reply is lost with the connection (closed below)
                if self.delay > 0:
                    time.sleep(self.delay)  # injected latency, not synchronisation
                while not self._flowing.wait(POLL):  # paused: hold the bytes back
                    if self._stopping.is_set():
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _close(self, *socks: socket.socket) -> None:
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            with self._lock:
                if sock in self._conns:
                    self._conns.remove(sock)

    # -- faults ------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop forwarding (connections stay open, bytes wait)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def drop_next_reply(self, refuse_after: bool = False) -> None:
        """Lose the next reply any connection gets from Redis, and close that connection;
        with ``refuse_after``, from that moment on also close every connection that sends
        anything (nothing reaches Redis) and every new one, until :meth:`serve`: Redis as
        good as gone, each call failing at once."""
        self.dropped.clear()
        self._refuse_after_drop = refuse_after
        self._drop_reply.set()

    def serve(self) -> None:
        """Forward again after ``drop_next_reply(refuse_after=True)``."""
        self._refusing.clear()

    def cut(self) -> int:
        """Close every open connection (both sides); return how many were closed."""
        with self._lock:
            conns = list(self._conns)
        self._close(*conns)
        self.cuts += 1
        return len(conns)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns) // 2

    def stop(self) -> None:
        self._stopping.set()
        self._flowing.set()
        self._listener.close()
        self.cut()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=2.0)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
