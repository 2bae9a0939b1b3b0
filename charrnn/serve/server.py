"""Running the app with uvicorn on a socket bound first, so a busy port is a one-line error."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from typing import Callable, Optional

from charrnn.errors import CharrnnError


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); ``CharrnnError`` if it cannot be."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CharrnnError(f"--host {host!r} is not an address this machine has: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise CharrnnError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def make_server(app, sock: socket.socket, graceful_s: float = 5.0, log_level: str = "warning"):
    """A ``uvicorn.Server`` for ``app`` on ``sock``. ``serve(server, sock)`` runs it.

    On shutdown it stops accepting, gives in-flight streams ``graceful_s`` seconds to finish,
    then cancels them.
    """
    import uvicorn

    class Server(uvicorn.Server):
        # uvicorn re-raises a captured SIGINT/SIGTERM after a graceful shutdown (so the process
        # dies of it, exit 130/143); a server stopped on purpose should exit 0.
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_s, lifespan="on",
                            access_log=False)
    return Server(config)


def serve(server, sock: socket.socket, on_ready: Optional[Callable[[], None]] = None) -> None:
    """Run ``server`` on ``sock`` until it is told to exit (SIGINT/SIGTERM in the main thread,
    or ``server.should_exit = True``)."""
    if on_ready is not None:
        _call_when_started(server, on_ready)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise CharrnnError("the server failed to start (run with --debug -v for details)")


def _call_when_started(server, fn: Callable[[], None]) -> None:
    original = server.startup

    async def startup(*args, **kwargs):
        await original(*args, **kwargs)
        if server.started:
            fn()

    server.startup = startup


class Background:
    """``app`` served by uvicorn in a background thread on ``host:port`` (port 0: a free one),
    as a context manager: tests and benchmarks talk to a real server at ``.url``.

    No signal handlers are touched (uvicorn installs none off the main thread).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, graceful_s: float = 2.0):
        self.app = app
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = make_server(app, self.sock, graceful_s=graceful_s)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="charrnn-serve")

    def __enter__(self) -> "Background":
        import time

        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise CharrnnError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
