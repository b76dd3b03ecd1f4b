"""Make moto's EC2 behave like EC2: a WSGI middleware in front of moto's own WSGI app.

moto answers every EC2 call instantly and permissively. Real EC2 has states that take time
(`creating`, `attaching`, `detaching`, `pending` snapshots), refuses impossible attachments
(other AZ, in use, not running), throttles, and denies calls without permission. This
middleware adds those, keeps its own timeline per resource and rewrites moto's XML answers
to match, and drives the block plane so attached volumes are real block devices.

Non-EC2 requests (sts, ssm, autoscaling, iam, ...) pass straight through; every call of
every service is recorded so a test can compare the actions used with the IAM policy.

moto's backends are process-global: one Ec2Fidelity per process at a time.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import urlencode

from xdrive.sandbox.blocks import BlockPlane, BlockPlaneError
from xdrive.sandbox.ec2wire import (
    EC2_NAMESPACE,
    Doc,
    Ec2Request,
    Reply,
    Signed,
    Where,
    account_of,
    action_of,
    always_values,
    ec2_error,
    ec2_response,
    passes,
    read_form,
    reason_phrase,
    set_text,
    signature,
    take_filters,
)
from xdrive.sandbox.iam_eval import Ec2State, ec2_checks, first_denied
from xdrive.sandbox.settings import Faults, Latencies

log = logging.getLogger(__name__)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
InstancesHook = Callable[[list[str]], None]
AttachPhase = Literal["attaching", "attached", "detaching"]

_DETACH_POLL_SECONDS = 0.05


def moto_app() -> WsgiApp:
    """moto's own WSGI app (what ``moto_server`` serves)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    app: WsgiApp = DomainDispatcherApplication(create_backend_app)
    return app


def reset_moto() -> None:
    """Forget every moto resource in this process (what ``POST /moto-api/reset`` does)."""
    from moto.moto_api._internal.models import moto_api_backend

    moto_api_backend.reset()


@dataclass(frozen=True)
class RecordedCall:
    """One API call as it reached the sandbox, with how it was answered."""

    service: str  # the SigV4 signing name: ec2, ssm, sts, autoscaling, iam, ...
    action: str  # AttachVolume; for S3 the action IAM authorizes the request as
    status: int  # HTTP status of the answer
    error_code: Optional[str] = None  # EC2 error code when status >= 400
    access_key: str = ""  # who called: the IAM policy test tells the agent from the launcher

    @property
    def iam_action(self) -> str:
        return f"{self.service}:{self.action}"


# -- the middleware's own timeline -------------------------------------------------------------


@dataclass(frozen=True)
class _VolumeTimeline:
    ready_at: float  # `creating` until then


@dataclass(frozen=True)
class _SnapshotTimeline:
    started_at: float
    done_at: float  # `pending` until then
    size_gib: int

    def state(self, now: float) -> tuple[str, str]:
        if now >= self.done_at:
            return "completed", "100%"
        fraction = (now - self.started_at) / (self.done_at - self.started_at)
        return "pending", f"{min(99, max(0, int(fraction * 100)))}%"


@dataclass(frozen=True)
class _Attachment:
    where: Where
    volume_id: str
    instance_id: str
    device: str
    attached_at: float  # `attaching` until then
    token: int  # tells this attachment's timers from a later attachment's
    detach_at: Optional[float] = None  # DetachVolume accepted: `detaching` at least until then
    force: bool = False

    def phase(self, now: float) -> AttachPhase:
        if self.detach_at is not None:
            return "detaching"
        return "attached" if now >= self.attached_at else "attaching"


_VOLUME_FILTERS = frozenset({"status", "attachment.status"})
_SNAPSHOT_FILTERS = frozenset({"status"})
_INSTANCE_FILTERS = frozenset({"instance-state-name"})


class Ec2Fidelity:
    """WSGI middleware: moto's API with EC2's states, checks, delays and faults."""

    def __init__(
        self,
        blocks: BlockPlane,
        app: WsgiApp | None = None,
        *,
        latencies: Latencies | None = None,
        faults: Faults | None = None,
        on_run_instances: InstancesHook | None = None,
        on_terminate_instances: InstancesHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._blocks = blocks
        self._app = app if app is not None else moto_app()
        self._latencies = latencies or Latencies()
        self._faults = faults or Faults()
        self._dice = random.Random(self._faults.seed)
        self._clock = clock
        self.on_run_instances = on_run_instances
        self.on_terminate_instances = on_terminate_instances
        # One lock for all EC2 handling: moto's backend is not thread-safe, and each check
        # must hold until the change it guards is made.
        self._lock = threading.RLock()
        self._volumes: dict[str, _VolumeTimeline] = {}
        self._snapshots: dict[str, _SnapshotTimeline] = {}
        self._attachments: dict[str, _Attachment] = {}
        # Instances shutting down: their TerminateInstances reaches moto once EC2 frees the
        # volumes (moto would detach them at once).
        self._terminations: dict[str, Ec2Request] = {}
        self._roots: dict[str, Path] = {}
        self._timers: set[threading.Timer] = set()
        self._tokens = 0
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()
        self._record_lock = threading.Lock()
        self._calls: list[RecordedCall] = []
        self._policies: dict[str, dict[str, Any]] = {}  # access key -> enforced IAM policy
        self._policy_denials: list[str] = []
        self._handlers: dict[str, Callable[[Ec2Request], Reply]] = {
            "AttachVolume": self._attach_volume,
            "DetachVolume": self._detach_volume,
            "CreateVolume": self._create_volume,
            "DeleteVolume": self._delete_volume,
            "DescribeVolumes": self._describe_volumes,
            "CreateSnapshot": self._create_snapshot,
            "DeleteSnapshot": self._delete_snapshot,
            "DescribeSnapshots": self._describe_snapshots,
            "DescribeInstances": self._describe_instances,
            "RunInstances": self._run_instances,
            "TerminateInstances": self._terminate_instances,
            "CreateLaunchTemplateVersion": self._create_launch_template_version,
        }

    # -- settings and bookkeeping -----------------------------------------------------------

    @property
    def latencies(self) -> Latencies:
        return self._latencies

    def set_latencies(self, latencies: Latencies) -> None:
        with self._lock:
            self._latencies = latencies

    @property
    def faults(self) -> Faults:
        return self._faults

    def set_faults(self, faults: Faults) -> None:
        with self._lock:
            self._faults = faults
            self._dice = random.Random(faults.seed)

    def register_instance(self, instance_id: str, root: Path) -> None:
        """Where an instance's root prefix is: its volumes' device links go under it."""
        with self._lock:
            self._roots[instance_id] = Path(root)

    def enforce_policy(self, access_key: str, policy: Optional[dict[str, Any]]) -> None:
        """Evaluate ``policy`` (an IAM policy document) for every EC2 call signed with
        ``access_key`` and refuse what it does not allow (None: stop enforcing)."""
        with self._lock:
            if policy is None:
                self._policies.pop(access_key, None)
            else:
                self._policies[access_key] = policy

    def policy_denials(self) -> tuple[str, ...]:
        """The checks an enforced policy refused ("ec2:Action on ARN"), oldest first."""
        with self._lock:
            return tuple(self._policy_denials)

    def recorded_actions(self) -> tuple[RecordedCall, ...]:
        with self._record_lock:
            return tuple(self._calls)

    def clear_recorded(self) -> None:
        with self._record_lock:
            self._calls.clear()

    def _record(self, call: RecordedCall) -> None:
        with self._record_lock:
            self._calls.append(call)

    def reset(self) -> None:
        """Forget everything: moto's resources, timelines, block devices and files."""
        with self._lock:
            self._cancel_timers()
            self._volumes.clear()
            self._snapshots.clear()
            self._attachments.clear()
            self._terminations.clear()
            self._roots.clear()
            self._blocks.teardown()
            reset_moto()
        self.clear_recorded()

    def close(self) -> None:
        """Stop background work (timers, the detach watcher). Block devices stay: teardown."""
        self._closed.set()
        with self._lock:
            self._cancel_timers()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def _cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def _later(self, delay: float, work: Callable[[], None]) -> None:
        """Run ``work`` under the lock after ``delay`` seconds (now, if delay is 0)."""
        if delay <= 0:
            work()
            return

        def fire() -> None:
            with self._lock:
                self._timers.discard(timer)
                if self._closed.is_set():
                    return
                try:
                    work()
                except Exception:
                    log.exception("sandbox EC2 background step failed")

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        self._timers.add(timer)
        timer.start()

    # -- WSGI ------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        signed = signature(environ)
        if signed is None:  # moto-api, IMDS stub, ...: not an AWS API call
            return self._app(environ, start_response)
        form = read_form(environ)
        action = action_of(environ, form, signed.service)
        if signed.service != "ec2":
            return self._pass_through(environ, start_response, signed, action)

        request = Ec2Request(
            environ=dict(environ),
            params=tuple(form),
            where=Where(account_of(environ, signed.access_key), signed.region),
            access_key=signed.access_key,
        )
        try:
            with self._lock:
                reply = self._answer(request)
        except Exception as e:  # a sandbox bug: still answer in EC2's format, and say why
            log.exception("sandbox EC2 failed on %s", action)
            reply = ec2_error("InternalError", f"sandbox failure: {e!r}", 500)
        self._record(RecordedCall("ec2", action, reply.status, reply.error_code, signed.access_key))
        for step in reply.after:  # hooks: outside the lock, before the caller hears back
            try:
                step()
            except Exception:
                log.exception("sandbox hook after %s failed", action)
        start_response(
            f"{reply.status} {reason_phrase(reply.status)}",
            [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body)))],
        )
        return [reply.body]

    def _pass_through(
        self,
        environ: dict[str, Any],
        start_response: Callable[..., Any],
        signed: Signed,
        action: str,
    ) -> Any:
        def recording_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            code = int(status.split(" ", 1)[0])
            self._record(RecordedCall(signed.service, action, code, None, signed.access_key))
            return start_response(status, headers, exc_info)

        return self._app(environ, recording_start_response)

    def _answer(self, request: Ec2Request) -> Reply:
        faults = self._faults
        if faults.throttle_rate > 0 and self._dice.random() < faults.throttle_rate:
            return ec2_error("RequestLimitExceeded", "Request limit exceeded.", 503)
        if request.action in faults.deny_actions:
            return ec2_error(
                "UnauthorizedOperation", "You are not authorized to perform this operation.", 403
            )
        policy = self._policies.get(request.access_key)
        if policy is not None:
            denied = first_denied(
                policy, ec2_checks(request.action, request.params, self._ec2_state(request.where))
            )
            if denied is not None:
                log.warning("sandbox IAM denied %s on %s", denied.action, denied.arn)
                self._policy_denials.append(f"{denied.action} on {denied.arn}")
                return ec2_error(
                    "UnauthorizedOperation",
                    "You are not authorized to perform this operation. "
                    f"(sandbox IAM: {denied.action} on {denied.arn})",
                    403,
                )
        handler = self._handlers.get(request.action, self._forward)
        return handler(request)

    def _ec2_state(self, where: Where) -> Ec2State:
        backend = where.backend()
        attached = {
            volume_id: volume.attachment.instance.id
            for volume_id, volume in backend.volumes.items()
            if getattr(volume, "attachment", None) is not None
        }
        attached.update({a.volume_id: a.instance_id for a in self._attachments.values()})
        return Ec2State(
            region=where.region,
            account=where.account,
            tags=backend.tags,  # read in place: checks run under the EC2 lock
            attached_to=attached,
            launch_templates={
                t.name: t.id for t in getattr(backend, "launch_templates", {}).values()
            },
        )

    def _forward(self, request: Ec2Request) -> Reply:
        """Hand the (possibly rewritten) request to moto and collect its whole answer."""
        body = urlencode(request.params).encode("utf-8")
        environ = dict(request.environ)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["CONTENT_TYPE"] = "application/x-www-form-urlencoded; charset=utf-8"
        environ["REQUEST_METHOD"] = "POST"
        environ["QUERY_STRING"] = ""  # every parameter is in the body now
        started: dict[str, Any] = {}
        chunks: list[bytes] = []

        def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            started["status"] = status
            started["headers"] = headers
            return chunks.append

        result = self._app(environ, start_response)
        try:
            chunks.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        content_type = dict(started.get("headers") or []).get("Content-Type", "text/xml")
        return Reply(int(str(started["status"]).split(" ", 1)[0]), b"".join(chunks), content_type)

    def _create_launch_template_version(self, request: Ec2Request) -> Reply:
        """moto keeps a new version's UserData as the raw string (its CreateLaunchTemplate
        decodes it), and its Auto Scaling then fails on the version: store it decoded too."""
        reply = self._forward(request)
        name = request.get("LaunchTemplateName")
        if reply.ok and name:
            from moto.ec2.utils import parse_user_data

            template = request.where.backend().get_launch_template_by_name(name)
            data = template.versions[-1].data
            if isinstance(data.get("UserData"), str):
                data["UserData"] = parse_user_data(data["UserData"])
        return reply

    def _now(self) -> float:
        return self._clock()

    # -- volumes ---------------------------------------------------------------------------

    def _create_volume(self, request: Ec2Request) -> Reply:
        snapshot_id = request.get("SnapshotId")
        size = request.get("Size")
        if snapshot_id and size is not None and size.isdigit():
            snapshot_size = self._snapshot_size(request.where, snapshot_id)
            if snapshot_size is not None and int(size) < snapshot_size:
                return ec2_error(
                    "InvalidParameterValue",
                    f"Volume of size {size}GB is smaller than snapshot '{snapshot_id}', "
                    f"expect size >= {snapshot_size}GB",
                )
        reply = self._forward(request)
        if not reply.ok:
            return reply
        doc = Doc.parse(reply.body)
        volume_id = doc.root.findtext("volumeId") or ""
        size_gib = int(doc.root.findtext("size") or 0)
        source = snapshot_id if snapshot_id and self._blocks.has_snapshot(snapshot_id) else None
        try:
            self._blocks.create_volume(volume_id, size_gib, from_snapshot=source)
        except Exception as e:
            request.where.backend().delete_volume(volume_id)
            return ec2_error("InternalError", f"sandbox could not create the volume: {e}", 500)
        timeline = _VolumeTimeline(ready_at=self._now() + self._latencies.volume_create)
        self._volumes[volume_id] = timeline
        self._rewrite_volume(doc.root, self._now())
        return replace(reply, body=doc.dump())

    def _snapshot_size(self, where: Where, snapshot_id: str) -> int | None:
        timeline = self._snapshots.get(snapshot_id)
        if timeline is not None:
            return timeline.size_gib
        snapshot = where.backend().snapshots.get(snapshot_id)
        return int(snapshot.volume_size) if snapshot is not None else None

    def _delete_volume(self, request: Ec2Request) -> Reply:
        reply = self._forward(request)  # moto refuses an attached volume with VolumeInUse
        volume_id = request.get("VolumeId") or ""
        if reply.ok and volume_id.startswith("vol-"):
            self._volumes.pop(volume_id, None)
            self._blocks.force_detach(volume_id)  # nothing to do unless state went astray
            self._blocks.delete_volume(volume_id)
        return reply

    def _describe_volumes(self, request: Ec2Request) -> Reply:
        params, filters = take_filters(request.params, _VOLUME_FILTERS)
        reply = self._forward(request.with_params(params))
        if not reply.ok:
            return reply
        doc = Doc.parse(reply.body)
        now = self._now()
        volume_set = doc.root.find("volumeSet")
        for item in list(volume_set if volume_set is not None else []):
            self._rewrite_volume(item, now)

            def values_of(name: str, item: ET.Element = item) -> list[str]:
                if name == "status":
                    return [item.findtext("status") or ""]
                return [a.findtext("status") or "" for a in item.iterfind("attachmentSet/item")]

            if not passes(filters, values_of):
                assert volume_set is not None
                volume_set.remove(item)
        return replace(reply, body=doc.dump())

    def _rewrite_volume(self, item: ET.Element, now: float) -> None:
        volume_id = item.findtext("volumeId") or ""
        timeline = self._volumes.get(volume_id)
        if timeline is not None and now < timeline.ready_at:
            set_text(item, "status", "creating")
        attachment = self._attachments.get(volume_id)
        if attachment is None:
            return
        for entry in item.iterfind("attachmentSet/item"):
            if entry.findtext("instanceId") == attachment.instance_id:
                set_text(entry, "status", attachment.phase(now))

    # -- attach / detach -------------------------------------------------------------------

    def _attach_volume(self, request: Ec2Request) -> Reply:
        backend = request.where.backend()
        volume_id = request.get("VolumeId") or ""
        instance_id = request.get("InstanceId") or ""
        device = request.get("Device") or ""
        volume = backend.volumes.get(volume_id)
        instance = next((i for i in backend.all_instances() if i.id == instance_id), None)
        if volume is None or instance is None or request.get("DryRun") == "true":
            return self._forward(request)  # moto's NotFound errors and DryRun answers
        now = self._now()
        timeline = self._volumes.get(volume_id)
        if timeline is not None and now < timeline.ready_at:
            return ec2_error("IncorrectState", f"The volume '{volume_id}' is not 'available'.")
        if volume.attachment is not None:
            return ec2_error("VolumeInUse", f"{volume_id} is already attached to an instance")
        if instance.state != "running" or instance_id in self._terminations:
            state = "shutting-down" if instance_id in self._terminations else instance.state
            return ec2_error(
                "IncorrectState", f"The instance '{instance_id}' is not 'running' ({state})."
            )
        if volume.availability_zone != instance.placement.zone:
            return ec2_error(
                "InvalidVolume.ZoneMismatch",
                f"The volume '{volume_id}' is not in the same availability zone as instance "
                f"'{instance_id}'",
            )
        if device in instance.block_device_mapping:
            return ec2_error(
                "InvalidParameterValue",
                f"Invalid value '{device}' for unixDevice. Attachment point {device} is "
                "already in use",
            )
        reply = self._forward(request)
        if not reply.ok:
            return reply
        self._tokens += 1
        attachment = _Attachment(
            where=request.where,
            volume_id=volume_id,
            instance_id=instance_id,
            device=device,
            attached_at=now + self._latencies.attach,
            token=self._tokens,
        )
        self._attachments[volume_id] = attachment
        delay = self._latencies.attach + self._latencies.device_appear
        self._later(delay, lambda: self._device_appears(volume_id, attachment.token))
        return reply

    def _device_appears(self, volume_id: str, token: int) -> None:
        """The guest sees the block device: loop device and links under its root."""
        attachment = self._attachments.get(volume_id)
        if attachment is None or attachment.token != token or attachment.detach_at is not None:
            return  # detached (or detaching) before the device showed up
        root = self._roots.get(attachment.instance_id)
        if root is None or not self._blocks.has_volume(volume_id):
            return  # an instance with no simulated root, or a volume with no file
        if attachment.instance_id in self._terminations:
            return
        try:
            self._blocks.attach(volume_id, root, attachment.device)
        except (BlockPlaneError, OSError):
            # The API already said attached; like a guest that never sees the disk.
            log.exception("block device for %s did not appear", volume_id)

    def _detach_volume(self, request: Ec2Request) -> Reply:
        backend = request.where.backend()
        volume_id = request.get("VolumeId") or ""
        volume = backend.volumes.get(volume_id)
        if volume is None or request.get("DryRun") == "true":
            return self._forward(request)
        if volume.attachment is None:
            return ec2_error("IncorrectState", f"Volume '{volume_id}' is in the 'available' state.")
        instance_id = volume.attachment.instance.id
        asked = request.get("InstanceId")
        if asked and asked != instance_id:
            return ec2_error(
                "InvalidAttachment.NotFound",
                f"Volume '{volume_id}' is not attached to instance '{asked}'",
            )
        now = self._now()
        attach_time = volume.attachment.attach_time.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        attachment = self._attachments.get(volume_id) or _Attachment(
            where=request.where,
            volume_id=volume_id,
            instance_id=instance_id,
            device=volume.attachment.device,
            attached_at=now,
            token=0,
        )
        if attachment.detach_at is None:
            attachment = replace(
                attachment,
                detach_at=now + self._latencies.detach,
                force=request.get("Force") == "true",
            )
            self._attachments[volume_id] = attachment
            try:
                self._try_complete_detach(attachment, now)
            except (BlockPlaneError, OSError):
                log.exception("detach of %s failed; the watcher retries", volume_id)
            if volume_id in self._attachments:
                self._start_watcher()
        return ec2_response(
            "DetachVolume",
            [
                ("volumeId", volume_id),
                ("instanceId", instance_id),
                ("device", attachment.device),
                ("status", "detaching"),
                ("attachTime", attach_time),
            ],
        )

    def _try_complete_detach(self, attachment: _Attachment, now: float) -> None:
        """Finish a detach once its latency passed and nothing has the device mounted."""
        assert attachment.detach_at is not None
        if now < attachment.detach_at:
            return
        volume_id = attachment.volume_id
        if not attachment.force and self._blocks.is_mounted(volume_id):
            return  # EC2 leaves it `detaching` for as long as the guest holds it
        if attachment.force:
            self._blocks.force_detach(volume_id)
        else:
            self._blocks.detach(volume_id)
        self._moto_detach(attachment)

    def _moto_detach(self, attachment: _Attachment) -> None:
        self._attachments.pop(attachment.volume_id, None)
        backend = attachment.where.backend()
        volume = backend.volumes.get(attachment.volume_id)
        if volume is None or volume.attachment is None:
            return
        if volume.attachment.instance.id == attachment.instance_id:
            backend.detach_volume(
                attachment.volume_id, attachment.instance_id, volume.attachment.device
            )

    def _start_watcher(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(
                target=self._watch_detaches, name="sandbox-detach-watcher", daemon=True
            )
            self._watcher.start()

    def _watch_detaches(self) -> None:
        while not self._closed.wait(_DETACH_POLL_SECONDS):
            with self._lock:
                pending = [a for a in self._attachments.values() if a.detach_at is not None]
                for attachment in pending:
                    try:
                        self._try_complete_detach(attachment, self._now())
                    except Exception:
                        log.exception("detach of %s failed", attachment.volume_id)
                if not pending:
                    self._watcher = None
                    return

    # -- snapshots -------------------------------------------------------------------------

    def _create_snapshot(self, request: Ec2Request) -> Reply:
        volume_id = request.get("VolumeId") or ""
        timeline = self._volumes.get(volume_id)
        if timeline is not None and self._now() < timeline.ready_at:
            return ec2_error("IncorrectState", f"The volume '{volume_id}' is not 'available'.")
        reply = self._forward(request)
        if not reply.ok:
            return reply
        doc = Doc.parse(reply.body)
        snapshot_id = doc.root.findtext("snapshotId") or ""
        size_gib = int(doc.root.findtext("volumeSize") or 0)
        if self._blocks.has_volume(volume_id):
            try:
                self._blocks.snapshot(volume_id, snapshot_id)  # point-in-time: now
            except Exception as e:
                request.where.backend().delete_snapshot(snapshot_id)
                return ec2_error("InternalError", f"sandbox could not copy the volume: {e}", 500)
        now = self._now()
        self._snapshots[snapshot_id] = _SnapshotTimeline(
            started_at=now, done_at=now + self._latencies.snapshot, size_gib=size_gib
        )
        self._rewrite_snapshot(doc.root, now)
        return replace(reply, body=doc.dump())

    def _rewrite_snapshot(self, item: ET.Element, now: float) -> None:
        timeline = self._snapshots.get(item.findtext("snapshotId") or "")
        if timeline is not None:
            state, progress = timeline.state(now)
            set_text(item, "status", state)
            set_text(item, "progress", progress)

    def _describe_snapshots(self, request: Ec2Request) -> Reply:
        params, filters = take_filters(request.params, _SNAPSHOT_FILTERS)
        reply = self._forward(request.with_params(params))
        if not reply.ok:
            return reply
        doc = Doc.parse(reply.body)
        now = self._now()
        snapshot_set = doc.root.find("snapshotSet")
        for item in list(snapshot_set if snapshot_set is not None else []):
            self._rewrite_snapshot(item, now)
            status = item.findtext("status") or ""
            if not passes(filters, always_values([status])):
                assert snapshot_set is not None
                snapshot_set.remove(item)
        return replace(reply, body=doc.dump())

    def _delete_snapshot(self, request: Ec2Request) -> Reply:
        reply = self._forward(request)
        snapshot_id = request.get("SnapshotId") or ""
        if reply.ok and snapshot_id.startswith("snap-"):
            self._snapshots.pop(snapshot_id, None)
            self._blocks.delete_snapshot(snapshot_id)
        return reply

    # -- instances -------------------------------------------------------------------------

    def _run_instances(self, request: Ec2Request) -> Reply:
        reply = self._forward(request)
        hook = self.on_run_instances
        if not reply.ok or hook is None:
            return reply
        ids = [e.text or "" for e in Doc.parse(reply.body).root.iterfind(".//instanceId")]
        return replace(reply, after=(lambda: hook(ids),))

    def _describe_instances(self, request: Ec2Request) -> Reply:
        params, filters = take_filters(request.params, _INSTANCE_FILTERS)
        reply = self._forward(request.with_params(params))
        if not reply.ok or not (filters or self._terminations or self._attachments):
            return reply
        doc = Doc.parse(reply.body)
        now = self._now()
        reservations = doc.root.find("reservationSet")
        for reservation in list(reservations if reservations is not None else []):
            instances = reservation.find("instancesSet")
            for item in list(instances if instances is not None else []):
                self._rewrite_instance(item, now)
                state = item.findtext("instanceState/name") or ""
                if not passes(filters, always_values([state])):
                    assert instances is not None
                    instances.remove(item)
            if instances is None or len(instances) == 0:
                assert reservations is not None
                reservations.remove(reservation)
        return replace(reply, body=doc.dump())

    def _rewrite_instance(self, item: ET.Element, now: float) -> None:
        instance_id = item.findtext("instanceId") or ""
        if instance_id in self._terminations:
            state = item.find("instanceState")
            if state is not None:
                set_text(state, "code", "32")
                set_text(state, "name", "shutting-down")
        for mapping in item.iterfind("blockDeviceMapping/item"):
            attachment = self._attachments.get(mapping.findtext("ebs/volumeId") or "")
            ebs = mapping.find("ebs")
            if attachment is not None and ebs is not None:
                set_text(ebs, "status", attachment.phase(now))

    def _terminate_instances(self, request: Ec2Request) -> Reply:
        """EC2 frees an instance's volumes a while after TerminateInstances, not at once."""
        backend = request.where.backend()
        ids = request.numbered("InstanceId")
        known = {i.id: i for i in backend.all_instances()}
        delay = self._latencies.terminate_detach
        acceptable = ids and all(i in known and not known[i].disable_api_termination for i in ids)
        if delay <= 0 or not acceptable or request.get("DryRun") == "true":
            if acceptable and request.get("DryRun") != "true":
                self._free_volumes_of(ids)
            reply = self._forward(request)
            return self._after_terminate(reply, ids)
        fields = []
        for instance_id in ids:
            previous = known[instance_id].instance_state
            self._terminations.setdefault(instance_id, request)
            fields.append((instance_id, str(previous.code), str(previous.name)))
        self._later(delay, lambda: self._finish_termination(ids))
        root = ET.Element("TerminateInstancesResponse")
        instances_set = ET.SubElement(root, "instancesSet")
        for instance_id, code, name in fields:
            item = ET.SubElement(instances_set, "item")
            ET.SubElement(item, "instanceId").text = instance_id
            current = ET.SubElement(item, "currentState")
            ET.SubElement(current, "code").text = "32"
            ET.SubElement(current, "name").text = "shutting-down"
            previous_state = ET.SubElement(item, "previousState")
            ET.SubElement(previous_state, "code").text = code
            ET.SubElement(previous_state, "name").text = name
        ET.SubElement(root, "requestId").text = str(uuid.uuid4())
        reply = Reply(200, Doc(root, EC2_NAMESPACE).dump())
        return self._after_terminate(reply, ids)

    def _after_terminate(self, reply: Reply, ids: list[str]) -> Reply:
        hook = self.on_terminate_instances
        if not reply.ok or hook is None:
            return reply
        return replace(reply, after=(lambda: hook(ids),))

    def _finish_termination(self, ids: list[str]) -> None:
        pending = [i for i in ids if i in self._terminations]
        if not pending:
            return
        request = self._terminations[pending[0]]
        self._free_volumes_of(pending)
        for instance_id in pending:
            self._terminations.pop(instance_id, None)
        params = [(k, v) for k, v in request.params if not k.startswith("InstanceId.")]
        params += [(f"InstanceId.{n}", i) for n, i in enumerate(pending, 1)]
        reply = self._forward(request.with_params(params))
        if not reply.ok:
            log.error("deferred TerminateInstances %s failed: %s", pending, reply.body[:500])

    def _free_volumes_of(self, instance_ids: Sequence[str]) -> None:
        """The instance is gone: its block devices vanish, EC2 marks its volumes detached."""
        for attachment in list(self._attachments.values()):
            if attachment.instance_id in instance_ids:
                self._blocks.force_detach(attachment.volume_id)
                self._moto_detach(attachment)


__all__ = [
    "Ec2Fidelity",
    "RecordedCall",
    "ec2_error",
    "moto_app",
    "reset_moto",
]
