"""Running a FastAPI app with uvicorn on a socket bound first: ``p5rec serve``, ``p5rec templates studio``, tests.

The socket is bound before anything slow happens (loading a model), so a busy port is one clear error at once, and
port 0 gives a free port without the race of probing for one and binding it later.
"""

from __future__ import annotations

import socket
import threading
import time


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one), bound here so that a busy port is one clear
    error before the model loads, and a test can ask for a free port without a race."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it a
    # response written in two parts (headers, body) waits ~40 ms for the client's delayed ACK on a kept-alive
    # connection (measured: 44 ms for /health instead of 1.4 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    return sock


class ServerThread:
    """A uvicorn server for ``app`` in a background thread (tests, benchmarks): ``start()`` returns once it
    answers, ``stop()`` shuts it down and joins the thread; also a context manager."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        """Binds the socket now (``port`` 0: a free one, then ``self.port``); nothing answers before ``start``."""
        import uvicorn

        self.sock = listen(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False,
                                                    timeout_graceful_shutdown=5))
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"the server at {self.url} did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def run_server(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` until interrupted (Ctrl-C), uvicorn's logging at ``log_level``."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False)).run(sockets=[sock])
