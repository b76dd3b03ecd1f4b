"""`xdrive sandbox up` runs this in the background: one Sandbox until told to stop.

It writes STATE_DIR/sandbox.json (endpoint, pid) once serving, and removes it on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from xdrive.sandbox.control import control_app
from xdrive.sandbox.core import Sandbox


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args()
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / "sandbox.json"
    shutdown = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: shutdown.set())
    signal.signal(signal.SIGINT, lambda *_: shutdown.set())
    sandbox = Sandbox(state_dir / "work").start()
    try:
        sandbox.server.mount("api", control_app(sandbox, shutdown))
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": sandbox.url, "pid": os.getpid()}))
        tmp.rename(state_file)
        shutdown.wait()
    finally:
        # Teardown first: `xdrive sandbox down` returns once this file is gone.
        try:
            sandbox.close()
            work = str(state_dir / "work")
            subprocess.run(["rm", "-rf", "--one-file-system", work], check=False)
        finally:
            state_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
