"""Serve the agent archive over http on 127.0.0.1, as the launcher's upload would be served.

The user-data's url mode fetches ``agent_archive()`` and checks its sha256; the embedded
agent (about 45 KB gzip'd) is over EC2's 16 KB user-data limit, so url mode is what a real
launch uses. Requests are counted so a test can tell the bootstrap did download it.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from xdrive.cloudinit.bundle import AgentArchive


class ArchiveServer:
    def __init__(self, archive: AgentArchive) -> None:
        self.archive = archive
        self.path = f"/xdrive-agent-{archive.version}.tar.gz"
        self.downloads = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != server.path:
                    self.send_error(404)
                    return
                server.downloads += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(server.archive.data)))
                self.end_headers()
                self.wfile.write(server.archive.data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{self.path}"

    def start(self) -> ArchiveServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
