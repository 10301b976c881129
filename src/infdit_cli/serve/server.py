"""The server's lifecycle: the web server (uvicorn) in a thread, the jobs in the calling thread, and the
signals that stop both."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable

from ..errors import InfditError, Interrupted, stopped_by
from .jobs import JobRunner

__all__ = ["address", "run"]

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def address(sock: socket.socket) -> str:
    """The URL of the listening socket."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def run(app, runner: JobRunner, sock: socket.socket, *,
        on_started: Callable[[], None] = lambda: None) -> None:
    """Serve `app` on `sock` and run `runner`'s jobs here until a signal (SIGINT, SIGTERM, SIGHUP) or the
    web server ends. The jobs run in this (main) thread, where torch's CPU work runs fastest; signals reach
    it and stop both; a second signal stops the web server without waiting for its connections.

    Raises:
        InfditError: the web server did not start.
        Interrupted: a signal stopped the server (its exit code 128 + the signal).
    """
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            lifespan="on")
    server = uvicorn.Server(config)
    web = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="infdit-web", daemon=True)
    got: list[int] = []

    def on_signal(signum, frame) -> None:
        got.append(signum)
        runner.request_stop()
        app.closing()  # end the event streams first: open streams would hold the stop up
        server.should_exit = True
        if len(got) > 1:
            server.force_exit = True

    before = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
    try:
        web.start()
        while not server.started and web.is_alive():
            time.sleep(0.05)
        if not server.started and not got:
            raise InfditError(f"the web server did not start on {address(sock)}")
        on_started()
        runner.run(alive=web.is_alive)
    finally:
        server.should_exit = True
        app.closing()
        web.join(30)
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if got:
        waiting = len(runner.queue())
        err = Interrupted(f"{stopped_by(got[0])}; the server stopped"
                          + (f", {waiting} job(s) wait for its next start" if waiting else ""))
        err.exit_code = 128 + got[0]
        raise err
