"""A loopback TCP proxy that can freeze: a network partition for tests, without root.

:class:`FreezableProxy` stands between a client and a server (PostgreSQL, PgBouncer) and
forwards bytes both ways from one selector thread; :meth:`~FreezableProxy.freeze` stops
forwarding without closing any socket, :meth:`~FreezableProxy.thaw` resumes,
:meth:`~FreezableProxy.reset` aborts every connection. Re-exported by ``pgserver``.

Rejected: iptables DROP rules or a network namespace would partition at the packet level,
so that the kernel stops acknowledging too and TCP keepalives fail as they would across a
real partition; but they need CAP_NET_ADMIN and tools that a developer's machine or
container may not have.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FreezableProxy"]


class _Pair:
    """One proxied connection: the client's socket and ours to the target."""

    __slots__ = ("client", "upstream", "to_client", "to_upstream", "eof")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.to_client = bytearray()     # read from upstream, not yet sent to the client
        self.to_upstream = bytearray()   # read from the client, not yet sent upstream
        self.eof: set[socket.socket] = set()  # sockets that sent EOF

    def peer(self, sock: socket.socket) -> socket.socket:
        return self.upstream if sock is self.client else self.client

    def outbox(self, sock: socket.socket) -> bytearray:
        """Bytes waiting to be written to ``sock``."""
        return self.to_client if sock is self.client else self.to_upstream


class FreezableProxy:
    """A loopback TCP proxy to ``target_host:target_port`` that can stop forwarding.

    :meth:`freeze` stops forwarding in both directions and stops accepting, without closing
    any socket: what a network partition looks like to both peers, except that the kernel
    still acknowledges what they send (so TCP keepalives and ``tcp_user_timeout`` do not
    fire; only a timeout in the client itself does). :meth:`thaw` delivers what was held
    back and resumes. One selector thread serves every connection.
    """

    _CHUNK = 65536
    _HIGH_WATER = 1 << 20  # stop reading a side while this much waits for its peer

    def __init__(self, target_host: str, target_port: int, *,
                 listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, 0))
        self._listener.listen(1024)
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._pairs: dict[socket.socket, _Pair] = {}
        self._interest: dict[socket.socket, int] = {}
        self._commands: list[tuple[str, threading.Event]] = []
        self._cmd_lock = threading.Lock()
        self._frozen = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"FreezableProxy:{self.port}",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def for_url(cls, url: str) -> "FreezableProxy":
        """A proxy to the host and port of a ``postgresql://`` URL."""
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def connections(self) -> int:
        """Proxied connections open right now."""
        return len(self._pairs) // 2

    def freeze(self) -> None:
        """Stop forwarding and accepting; nothing moves once this returns."""
        self._command("freeze")

    def thaw(self) -> None:
        """Forward again, held-back bytes and waiting connections first."""
        self._command("thaw")

    def reset(self) -> None:
        """Abort every proxied connection with a TCP reset (both sides see it)."""
        self._command("reset")

    def close(self) -> None:
        """Reset every connection, stop listening, end the thread. Idempotent."""
        if not self._closed and self._thread.is_alive():
            self._command("close")
            self._thread.join(10)

    def __enter__(self) -> "FreezableProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _command(self, name: str) -> None:
        if self._closed:
            raise RuntimeError("proxy closed")
        done = threading.Event()
        with self._cmd_lock:
            self._commands.append((name, done))
        self._wake_w.send(b"x")
        if not done.wait(10):
            raise RuntimeError(f"proxy thread did not answer {name!r}")

    # the loop (one thread)
    def _run(self) -> None:
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._set_interest(self._listener, selectors.EVENT_READ)
        try:
            while not self._closed:
                for key, mask in self._sel.select():
                    sock = key.fileobj
                    if sock is self._wake_r:
                        self._run_commands()
                    elif self._frozen:
                        continue  # a command froze us during this round
                    elif sock is self._listener:
                        self._accept()
                    elif sock in self._pairs:
                        self._pump(sock, mask)
        finally:
            for sock in list(self._pairs):
                self._abort(self._pairs.get(sock))
            self._sel.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _run_commands(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._cmd_lock:
            commands, self._commands = self._commands, []
        for name, done in commands:
            if name == "freeze":
                self._frozen = True
            elif name == "thaw":
                self._frozen = False
            elif name == "reset":
                for pair in {id(p): p for p in self._pairs.values()}.values():
                    self._abort(pair)
            elif name == "close":
                self._closed = True
            self._refresh_all()
            done.set()

    def _set_interest(self, sock: socket.socket, events: int) -> None:
        old = self._interest.get(sock, 0)
        if events == old:
            return
        if not old:
            self._sel.register(sock, events)
        elif not events:
            self._sel.unregister(sock)
        else:
            self._sel.modify(sock, events)
        if events:
            self._interest[sock] = events
        else:
            self._interest.pop(sock, None)

    def _refresh_all(self) -> None:
        self._set_interest(self._listener, 0 if self._frozen else selectors.EVENT_READ)
        for sock in list(self._pairs):
            self._refresh(sock)

    def _refresh(self, sock: socket.socket) -> None:
        pair = self._pairs.get(sock)
        if pair is None:
            return
        events = 0
        if not self._frozen:
            if sock not in pair.eof and len(pair.outbox(pair.peer(sock))) < self._HIGH_WATER:
                events |= selectors.EVENT_READ
            if pair.outbox(sock):
                events |= selectors.EVENT_WRITE
        self._set_interest(sock, events)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._rst(client)
                continue
            for s in (client, upstream):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            self._pairs[client] = self._pairs[upstream] = pair
            self._refresh(client)
            self._refresh(upstream)

    def _pump(self, sock: socket.socket, mask: int) -> None:
        pair = self._pairs[sock]
        peer = pair.peer(sock)
        try:
            if mask & selectors.EVENT_READ:
                data = sock.recv(self._CHUNK)
                if data:
                    pair.outbox(peer).extend(data)
                else:
                    pair.eof.add(sock)
            if mask & selectors.EVENT_WRITE or pair.outbox(peer):
                for target in (sock, peer):
                    box = pair.outbox(target)
                    if box:
                        sent = target.send(box)
                        del box[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self._abort(pair)
            return
        # Pass an EOF on once everything before it was delivered; close when both are done.
        for s in (pair.client, pair.upstream):
            if s in pair.eof and not pair.outbox(pair.peer(s)):
                try:
                    pair.peer(s).shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if len(pair.eof) == 2 and not pair.to_client and not pair.to_upstream:
            self._drop(pair, reset=False)
            return
        self._refresh(sock)
        self._refresh(peer)

    def _rst(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()

    def _abort(self, pair: _Pair | None) -> None:
        if pair is not None:
            self._drop(pair, reset=True)

    def _drop(self, pair: _Pair, reset: bool) -> None:
        for s in (pair.client, pair.upstream):
            self._set_interest(s, 0)
            self._pairs.pop(s, None)
            if reset:
                self._rst(s)
            else:
                s.close()

    def __repr__(self) -> str:
        state = "frozen" if self._frozen else "forwarding"
        return (f"<FreezableProxy {self.host}:{self.port} -> {self.target[0]}:"
                f"{self.target[1]} {state}, {self.connections} connections>")
