"""The EC2 query protocol as the sandbox's middleware handles it: who signed a request and
for which action, its parameters, EC2's XML answers and errors, and the filters the
middleware evaluates itself (moto does not know the states it adds).
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from xdrive.sandbox.s3actions import s3_action

CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/\d{8}/([^/]+)/([^/]+)/aws4_request")
ERROR_CODE = re.compile(rb"<Code>([^<]*)</Code>")
EC2_NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15/"


# -- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    access_key: str
    region: str
    service: str


def signature(environ: dict[str, Any]) -> Signed | None:
    match = CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
    if not match:
        return None
    return Signed(match.group(1), match.group(2), match.group(3).lower())


def read_form(environ: dict[str, Any]) -> list[tuple[str, str]]:
    """Query-protocol parameters (body, else query string); the body stays readable."""
    if environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        environ["wsgi.input"] = io.BytesIO(body)
        if body:
            return parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    return parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)


def action_of(environ: dict[str, Any], form: Sequence[tuple[str, str]], service: str) -> str:
    if service == "s3":  # REST: the action IAM authorizes the request as
        return s3_action(
            environ.get("REQUEST_METHOD", "GET"),
            environ.get("PATH_INFO", "/"),
            environ.get("QUERY_STRING", ""),
        )
    for key, value in form:
        if key == "Action":
            return value
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:
        return target.rsplit(".", 1)[-1]  # JSON protocol: "AmazonSSM.GetParameter"
    return f"{environ.get('REQUEST_METHOD', 'GET')} {environ.get('PATH_INFO', '/')}"


def account_of(environ: dict[str, Any], access_key: str) -> str:
    # The same precedence moto uses, so we look at the backend moto will use.
    if "MOTO_ACCOUNT_ID" in os.environ:
        return os.environ["MOTO_ACCOUNT_ID"]
    if "HTTP_X_MOTO_ACCOUNT_ID" in environ:
        return str(environ["HTTP_X_MOTO_ACCOUNT_ID"])
    from moto.iam.models import get_account_id_from

    return get_account_id_from(access_key)


@dataclass(frozen=True)
class Where:
    """Which moto backend a resource lives in."""

    account: str
    region: str

    def backend(self) -> Any:
        from moto.ec2.models import ec2_backends

        return ec2_backends[self.account][self.region]


def numbered(params: Iterable[tuple[str, str]], prefix: str) -> list[str]:
    """Values of ``Prefix.1``, ``Prefix.2``, ... (EC2's list parameters)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.\d+$")
    return [value for key, value in params if pattern.match(key)]


@dataclass(frozen=True)
class Ec2Request:
    environ: dict[str, Any]
    params: tuple[tuple[str, str], ...]
    where: Where
    access_key: str = ""

    @property
    def action(self) -> str:
        return self.get("Action") or ""

    def get(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return None

    def numbered(self, prefix: str) -> list[str]:
        """Values of ``Prefix.1``, ``Prefix.2``, ... (EC2's list parameters)."""
        return numbered(self.params, prefix)

    def with_params(self, params: Iterable[tuple[str, str]]) -> Ec2Request:
        return replace(self, params=tuple(params))


# -- replies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "text/xml"
    after: tuple[Callable[[], None], ...] = ()  # run once the EC2 lock is released

    @property
    def ok(self) -> bool:
        return self.status < 400

    @property
    def error_code(self) -> str | None:
        if self.ok:
            return None
        match = ERROR_CODE.search(self.body)
        return match.group(1).decode() if match else None


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def ec2_error(code: str, message: str, status: int = 400) -> Reply:
    """EC2's error document, the one botocore's ec2 parser reads."""
    root = ET.Element("Response")
    error = ET.SubElement(ET.SubElement(root, "Errors"), "Error")
    ET.SubElement(error, "Code").text = code
    ET.SubElement(error, "Message").text = message
    ET.SubElement(root, "RequestID").text = str(uuid.uuid4())
    return Reply(status, ET.tostring(root, encoding="utf-8", xml_declaration=True))


@dataclass
class Doc:
    """An EC2 XML answer with its namespace taken off, to edit by plain tag names."""

    root: ET.Element
    namespace: str

    @classmethod
    def parse(cls, body: bytes) -> Doc:
        root = ET.fromstring(body)
        namespace = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
        for element in root.iter():
            if element.tag.startswith("{"):
                element.tag = element.tag.split("}", 1)[1]
        return cls(root, namespace)

    def dump(self) -> bytes:
        if self.namespace:
            self.root.set("xmlns", self.namespace)
        return ET.tostring(self.root, encoding="utf-8", xml_declaration=True)


def set_text(element: ET.Element, tag: str, text: str) -> None:
    child = element.find(tag)
    if child is None:
        child = ET.SubElement(element, tag)
    child.text = text


def ec2_response(action: str, fields: Sequence[tuple[str, str]]) -> Reply:
    root = ET.Element(f"{action}Response")
    for tag, text in fields:
        ET.SubElement(root, tag).text = text
    ET.SubElement(root, "requestId").text = str(uuid.uuid4())
    return Reply(200, Doc(root, EC2_NAMESPACE).dump())


# -- filters ---------------------------------------------------------------------------------

Filter = tuple[str, tuple[str, ...]]
_FILTER_KEY = re.compile(r"^Filter\.(\d+)\.(Name|Value\.\d+)$")


def take_filters(
    params: Sequence[tuple[str, str]], names: frozenset[str]
) -> tuple[list[tuple[str, str]], list[Filter]]:
    """Split out the filters the middleware answers itself; renumber the rest for moto."""
    others: list[tuple[str, str]] = []
    groups: dict[int, dict[str, Any]] = {}
    for key, value in params:
        match = _FILTER_KEY.match(key)
        if not match:
            others.append((key, value))
            continue
        group = groups.setdefault(int(match.group(1)), {"name": "", "values": []})
        if match.group(2) == "Name":
            group["name"] = value
        else:
            group["values"].append(value)
    taken: list[Filter] = []
    kept = 0
    for _, group in sorted(groups.items()):
        if group["name"] in names:
            taken.append((group["name"], tuple(group["values"])))
            continue
        kept += 1
        others.append((f"Filter.{kept}.Name", group["name"]))
        others.extend((f"Filter.{kept}.Value.{i}", v) for i, v in enumerate(group["values"], 1))
    return others, taken


def passes(filters: Sequence[Filter], values_of: Callable[[str], Sequence[str]]) -> bool:
    """EC2 semantics: all filters must match; any value of a filter may match (with * and ?)."""
    for name, patterns in filters:
        actual = values_of(name)
        if not any(fnmatch.fnmatchcase(a, p) for a in actual for p in patterns):
            return False
    return True


def always_values(values: Sequence[str]) -> Callable[[str], Sequence[str]]:
    """Values for a resource filtered on one field only."""
    return lambda _name: values
