"""A small TCP forwarder to put between the proxy and a Jupyter server, so that tests can cut
every connection at once (as a network failure would) while new ones still get through.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time


class TcpForwarder:
    """Listens on a free loopback port and relays each connection to `target_port`."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stopped = threading.Event()
        self._frozen = threading.Event()
        self._dead: set[socket.socket] = set()  # connections blackholed: nothing relayed
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        try:
            while not self._stopped.is_set():
                if self._frozen.is_set() or a in self._dead:
                    time.sleep(0.01)
                    continue
                for key, _ in selector.select(timeout=0.1):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            self._close_pair(a, b)

    def _close_pair(self, a: socket.socket, b: socket.socket) -> None:
        for sock in (a, b):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        with self._lock:
            if (a, b) in self._pairs:
                self._pairs.remove((a, b))

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def freeze(self) -> None:
        """Stops relaying (until the next `cut`): what is sent meanwhile waits, already
        acknowledged to its sender, in the forwarder's buffers, and a cut loses it, as a
        network failure loses what is on the wire.
        """
        self._frozen.set()

    def blackhole(self) -> int:
        """Stops relaying the open connections, for good, without closing them: what a NAT or
        a firewall that forgets a flow does (no FIN, no RST). New connections get through.
        Returns how many there were."""
        with self._lock:
            self._dead.update(a for a, _ in self._pairs)
            return len(self._pairs)

    def cut(self) -> int:
        """Breaks every open connection, both ways; returns how many there were."""
        with self._lock:
            pairs = list(self._pairs)
        for a, b in pairs:
            self._close_pair(a, b)
        self._frozen.clear()
        return len(pairs)

    def close(self) -> None:
        self._stopped.set()
        self.cut()
        self._thread.join()
        self.listener.close()
