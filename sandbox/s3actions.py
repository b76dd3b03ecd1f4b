"""The IAM action an S3 REST request is authorized as.

S3 names no action in its requests (it is REST: a method on a path); IAM authorizes each
request as one ``s3:`` action. The mapping below covers the requests xdrive makes, with
path-style addressing (what botocore uses against a 127.0.0.1 endpoint). Anything else
is left as ``METHOD /path`` so that a policy test flags it rather than guessing.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

# Bucket subresources (the query key) that are their own IAM action, by method.
_BUCKET_SUBRESOURCES = {
    ("PUT", "publicAccessBlock"): "PutBucketPublicAccessBlock",
    ("GET", "publicAccessBlock"): "GetBucketPublicAccessBlock",
    ("GET", "location"): "GetBucketLocation",
}


def s3_action(method: str, path: str, query: str) -> str:
    """``s3`` action name (without the prefix) for one request."""
    method = method.upper()
    bucket, _, key = path.lstrip("/").partition("/")
    keys = {name for name, _ in parse_qsl(query, keep_blank_values=True)}
    if not bucket:
        if method == "GET":
            return "ListAllMyBuckets"
    elif not key:
        for (verb, sub), action in _BUCKET_SUBRESOURCES.items():
            if method == verb and sub in keys:
                return action
        if not keys - {"list-type", "prefix", "max-keys", "continuation-token", "encoding-type"}:
            if method in ("GET", "HEAD"):  # ListObjects(V2); HeadBucket is authorized as it
                return "ListBucket"
            if method == "PUT" and not keys:
                return "CreateBucket"
            if method == "DELETE" and not keys:
                return "DeleteBucket"
    elif not keys:
        if method in ("GET", "HEAD"):  # HeadObject is authorized as GetObject
            return "GetObject"
        if method == "PUT":
            return "PutObject"
        if method == "DELETE":
            return "DeleteObject"
    return f"{method} {path}"
