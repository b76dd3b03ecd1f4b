"""The sandbox's control API (`/sandbox/api/...` on its endpoint), for `xdrive sandbox`.

POST /sandbox/api/launch           {"availability_zone", "instance_type", "spot"}
POST /sandbox/api/agent/start      {"instance_id", "drive", "size_gib"?}
POST /sandbox/api/agent/stop       {"instance_id"}
POST /sandbox/api/notice           {"instance_id", "action"?, "in_seconds"?}
POST /sandbox/api/rebalance        {"instance_id"}
POST /sandbox/api/terminate        {"instance_id", "graceful"?}
GET  /sandbox/api/state
POST /sandbox/api/shutdown
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable

from werkzeug.wrappers import Request, Response

from xdrive.errors import XdriveError
from xdrive.sandbox.core import Sandbox

Handler = Callable[[Sandbox, dict[str, Any]], Any]


def _launch(sb: Sandbox, body: dict[str, Any]) -> Any:
    inst = sb.launch(
        body.get("availability_zone", "us-east-1a"),
        body.get("instance_type", "t3.micro"),
        bool(body.get("spot", True)),
    )
    return {"instance_id": inst.instance_id, "availability_zone": inst.availability_zone}


def _agent_start(sb: Sandbox, body: dict[str, Any]) -> Any:
    inst = sb.instance(_required(body, "instance_id"))
    config = sb.agent_config(inst, _required(body, "drive"), size_gib=int(body.get("size_gib", 1)))
    sb.start_agent(inst.instance_id, config)
    status = sb.wait_ready(inst.instance_id, float(body.get("timeout_s", 120)))
    return {"instance_id": inst.instance_id, "status": status.message}


def _agent_stop(sb: Sandbox, body: dict[str, Any]) -> Any:
    return {"exit_status": sb.stop_agent(_required(body, "instance_id"))}


def _notice(sb: Sandbox, body: dict[str, Any]) -> Any:
    at = sb.notice(
        _required(body, "instance_id"),
        body.get("action", "terminate"),
        float(body.get("in_seconds", 120)),
    )
    return {"time": at.isoformat()}


def _rebalance(sb: Sandbox, body: dict[str, Any]) -> Any:
    return {"time": sb.rebalance(_required(body, "instance_id")).isoformat()}


def _terminate(sb: Sandbox, body: dict[str, Any]) -> Any:
    sb.terminate(_required(body, "instance_id"), graceful=bool(body.get("graceful", True)))
    return {"terminated": body["instance_id"]}


def _required(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise XdriveError(f"missing {key!r} in the request", f"send {{{key!r}: ...}}")
    return value


ROUTES: dict[str, Handler] = {
    "/launch": _launch,
    "/agent/start": _agent_start,
    "/agent/stop": _agent_stop,
    "/notice": _notice,
    "/rebalance": _rebalance,
    "/terminate": _terminate,
    "/state": lambda sb, _body: sb.describe(),
}


def control_app(sandbox: Sandbox, shutdown: threading.Event) -> Callable[..., Any]:
    @Request.application
    def app(request: Request) -> Response:
        path = request.path
        if path == "/shutdown" and request.method == "POST":
            shutdown.set()
            return _json({"shutting_down": True})
        handler = ROUTES.get(path)
        if request.method not in ("GET", "POST"):
            return _json({"error": f"method {request.method} not allowed"}, 405)
        if handler is None:
            return _json({"error": f"unknown sandbox API path {path}"}, 404)
        try:
            body = request.get_json(silent=True) or {}
            return _json(handler(sandbox, body))
        except XdriveError as e:
            return _json({"error": str(e)}, 400)

    return app


def _json(value: Any, status: int = 200) -> Response:
    return Response(json.dumps(value, default=str), status, mimetype="application/json")
