"""Push an OCI image layout (an index of manifests, or one manifest) to a plain-HTTP registry.

What the startup benchmark needs after `soci convert --standalone`: the converted layout's
root (an OCI image index holding the image manifest and the SOCI index manifest) pushed under
a tag. Blobs the repository already has (HEAD answers 200) are not sent again, so the image's
layers, pushed before as `:plain`, cost nothing; the rest is a monolithic upload (POST, then
PUT with the digest). Manifests are put children first, by digest, then the root by tag.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")  # fmt: skip
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")  # fmt: skip


class Pusher:
    def __init__(self, host: str, repo: str) -> None:
        self.host, self.repo = host, repo

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, timeout=600)

    def _request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = self._conn()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def has_blob(self, digest: str) -> bool:
        status, _, _ = self._request("HEAD", f"/v2/{self.repo}/blobs/{digest}")
        return status == 200

    def put_blob(self, path: Path, digest: str) -> None:
        if self.has_blob(digest):
            return
        status, headers, data = self._request("POST", f"/v2/{self.repo}/blobs/uploads/")
        if status != 202 or "location" not in headers:
            raise RuntimeError(f"upload of {digest} not started: {status} {data[:300]!r}")
        loc = urlsplit(headers["location"])
        target = loc.path + ("?" + loc.query + "&" if loc.query else "?") + f"digest={digest}"
        size = path.stat().st_size
        with open(path, "rb") as f:
            status, _, data = self._request(
                "PUT",
                target,
                body=f,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )
        if status != 201:
            raise RuntimeError(f"upload of {digest} failed: {status} {data[:300]!r}")

    def put_manifest(self, ref: str, media_type: str, data: bytes) -> None:
        status, _, body = self._request(
            "PUT", f"/v2/{self.repo}/manifests/{ref}", body=data,
            headers={"Content-Type": media_type},
        )  # fmt: skip
        if status != 201:
            raise RuntimeError(f"manifest {ref} refused: {status} {body[:500]!r}")


def _blob(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return layout / "blobs" / algo / hexd


def push_layout(layout: Path, host: str, repo: str, tag: str) -> str:
    """Push the layout's single root (index.json's only entry) as `repo:tag`; its digest."""
    top = json.loads((layout / "index.json").read_text())
    if len(top.get("manifests", [])) != 1:
        raise ValueError(f"{layout}: index.json must hold exactly one root")
    root = top["manifests"][0]
    pusher = Pusher(host, repo)
    _push(pusher, layout, root, tag)
    return str(root["digest"])


def _push(pusher: Pusher, layout: Path, desc: dict[str, Any], ref: str | None) -> None:
    data = _blob(layout, desc["digest"]).read_bytes()
    media_type = desc["mediaType"]
    doc = json.loads(data)
    if media_type in INDEX_TYPES:
        for child in doc.get("manifests", []):
            _push(pusher, layout, child, None)
    elif media_type in MANIFEST_TYPES:
        for blob in [doc["config"], *doc.get("layers", [])]:
            pusher.put_blob(_blob(layout, blob["digest"]), blob["digest"])
    else:
        raise ValueError(f"cannot push {media_type}")
    pusher.put_manifest(desc["digest"], media_type, data)
    if ref is not None:
        pusher.put_manifest(ref, media_type, data)
