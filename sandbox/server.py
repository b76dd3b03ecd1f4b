"""Serve the sandbox's AWS API over HTTP on 127.0.0.1, plus control routes under /sandbox/.

    fidelity = Ec2Fidelity(BlockPlane(workdir))
    server = SandboxServer(fidelity)
    server.mount("notice", notice_app)      # POST {url}/sandbox/notice -> notice_app
    server.start()
    boto3.client("ec2", endpoint_url=server.url, region_name="us-east-1", ...)
    server.stop()

Control handlers are plain WSGI apps (a werkzeug ``Request.application`` function is one);
a handler mounted at ``notice`` gets ``/sandbox/notice`` and everything below it, with
``PATH_INFO`` set to the rest of the path.
"""

from __future__ import annotations

import threading
from typing import Any

from moto.moto_server.werkzeug_app import MotoRequestHandler
from werkzeug.serving import BaseWSGIServer, make_server

from xdrive.sandbox.fidelity import Ec2Fidelity, WsgiApp

CONTROL_PREFIX = "/sandbox/"


class _QuietHandler(MotoRequestHandler):
    """moto's handler (keeps underscores in header names) without a log line per request."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class SandboxServer:
    """werkzeug's threaded server for the fidelity middleware, in a background thread."""

    def __init__(
        self,
        fidelity: Ec2Fidelity,
        host: str = "127.0.0.1",
        port: int = 0,
        routes: dict[str, WsgiApp] | None = None,
    ) -> None:
        self.fidelity = fidelity
        self._host = host
        self._port = port
        self._routes: dict[str, WsgiApp] = {}
        for path, handler in (routes or {}).items():
            self.mount(path, handler)
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def mount(self, path: str, handler: WsgiApp) -> None:
        """Serve ``handler`` at ``/sandbox/<path>`` (and below it)."""
        self._routes[path.strip("/")] = handler

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("sandbox server is not started")
        return f"http://{self._host}:{self._server.server_port}"

    def start(self) -> SandboxServer:
        if self._server is not None:
            return self
        server = make_server(
            self._host, self._port, self._dispatch, threaded=True, request_handler=_QuietHandler
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() waits for one poll
            name="sandbox-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def reset(self) -> None:
        """Forget every AWS resource (moto and the sandbox's own state, devices, files)."""
        self.fidelity.reset()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _dispatch(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(CONTROL_PREFIX):
            return self.fidelity(environ, start_response)
        rest = path[len(CONTROL_PREFIX) :]
        # Longest mount first, so "instances/notice" wins over "instances".
        for mount in sorted(self._routes, key=len, reverse=True):
            if rest == mount or rest.startswith(mount + "/"):
                environ = dict(environ)
                environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + CONTROL_PREFIX + mount
                environ["PATH_INFO"] = rest[len(mount) :]
                return self._routes[mount](environ, start_response)
        body = f"no sandbox route for {path}\n".encode()
        start_response(
            "404 Not Found",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
        )
        return [body]
