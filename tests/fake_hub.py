"""A tiny fake of the Hugging Face Hub HTTP API, served on 127.0.0.1, for push-to-hub tests.

It implements only what ``huggingface_hub`` 2.x sends for ``create_repo``, ``upload_folder`` /
``create_commit`` (preupload + NDJSON commit, every file as a "regular" base64 blob), ``model_info``,
``whoami`` and file downloads (``HEAD``/``GET .../resolve/...``, so ``ModelCard.load(repo_id)`` works).
Every request is recorded; anything else gets a 404 and lands in :attr:`FakeHub.unhandled`, so a test can
assert that nothing unexpected was asked for. Nothing is mocked inside the client: point it here with
``HF_ENDPOINT=<FakeHub.url>`` (read by ``huggingface_hub.constants`` at import, so set it in a subprocess's
environment) and a fake token.

Example:
    >>> with FakeHub() as hub:
    ...     hub.url.startswith("http://127.0.0.1:")
    True
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

FAKE_USER = "fake-user"
FAKE_TOKEN = "hf_fakeTokenForTestsOnly0000000000000"

_REPO_API = re.compile(r"^/api/(models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass
class FakeRepo:
    """One repository held by the fake hub: its files (latest content) and its commits."""

    repo_id: str
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


class FakeHub:
    """Context manager running the fake hub in a daemon thread on an ephemeral 127.0.0.1 port."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.auth_headers: list[str | None] = []
        self.validated: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- helpers for tests -----------------------------------------------------------------------------
    def file(self, repo_id: str, path: str) -> bytes:
        """Latest content of ``path`` in ``repo_id`` (KeyError if it never arrived)."""
        return self.repos[repo_id].files[path]

    # -- request handling (called from the handler threads) --------------------------------------------
    def _create_repo(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body.get("name")
        if not name:
            return 400, {"error": "name is required"}
        repo_id = f"{body.get('organization') or FAKE_USER}/{name}"
        kind = body.get("type") or "model"
        prefix = "" if kind == "model" else f"{kind}s/"
        url = f"{self.url}/{prefix}{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}
            self.repos[repo_id] = FakeRepo(repo_id, private=body.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def _validate_yaml(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Stricter than needed on purpose: the metadata must be a YAML mapping that survives strict JSON
        (no inf/nan, which the Hub's JSON ``cardData`` cannot hold) and ``tags`` must be a list of strings."""
        errors: list[str] = []
        try:
            meta = _front_matter(body.get("content") or "")
        except Exception as exc:  # yaml.YAMLError
            meta, errors = None, [f"invalid YAML: {exc}"]
        if meta is not None and not isinstance(meta, dict):
            errors.append("metadata must be a mapping")
        elif meta:
            try:
                json.dumps(meta, allow_nan=False)
            except (TypeError, ValueError) as exc:
                errors.append(f"metadata is not strict JSON: {exc}")
            tags = meta.get("tags")
            if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
                errors.append("tags must be a list of strings")
        self.validated.append({"meta": meta, "errors": errors})
        if errors:
            return 400, {"errors": [{"message": m} for m in errors], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def _preupload(self, repo_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for f in body.get("files", [])
        ]
        return 200, {"files": files, "commitOid": self.repos[repo_id].sha}

    def _commit(self, repo_id: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        header: dict[str, Any] = {}
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    return 400, {"error": f"unsupported encoding {value.get('encoding')!r}"}
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:  # lfsFile etc.: never requested, since preupload answers "regular" for every file
                return 400, {"error": f"fake hub does not support commit operation {key!r}"}
        repo = self.repos[repo_id]
        oid = hashlib.sha1(repo.sha.encode() + raw).hexdigest()
        with self._lock:
            for path in deleted:
                repo.files = {p: c for p, c in repo.files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            repo.files.update(added)
            repo.commits.append({"oid": oid, "summary": header.get("summary"), "files": sorted(added), "deleted": deleted,
                                 "contents": added})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def _model_info(self, repo_id: str) -> tuple[int, dict[str, Any]]:
        repo = self.repos[repo_id]
        card_data = None
        readme = repo.files.get("README.md")
        if readme is not None:
            card_data = _front_matter(readme.decode("utf-8"))
        return 200, {
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.sha,
            "private": repo.private,
            "tags": list((card_data or {}).get("tags") or []),
            "cardData": card_data,
            "siblings": [{"rfilename": p} for p in sorted(repo.files)],
        }


def _front_matter(text: str) -> dict[str, Any] | None:
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, flags=re.S)
    return yaml.safe_load(match.group(1)) if match else None


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _route(self, method: str) -> None:
        hub = self.fake_hub
        path = unquote(urlsplit(self.path).path)
        body = self._body() if method in ("POST", "PUT") else b""
        hub.requests.append((method, path))
        hub.auth_headers.append(self.headers.get("Authorization"))

        if method == "GET" and path in ("/api/whoami-v2", "/api/whoami"):
            return self._send(200, {"type": "user", "name": FAKE_USER, "auth": {"accessToken": {"role": "write"}}})
        if method == "POST" and path == "/api/validate-yaml":
            return self._send(*hub._validate_yaml(json.loads(body or b"{}")))
        if method == "POST" and path == "/api/repos/create":
            return self._send(*hub._create_repo(json.loads(body or b"{}")))

        m = _REPO_API.match(path)
        if m and m.group(1) == "models":
            repo_id, rest = m.group("repo"), m.group("rest") or ""
            if repo_id not in hub.repos:
                return self._send(404, {"error": f"Repository {repo_id} not found"},
                                  headers={"X-Error-Code": "RepoNotFound"})
            if method == "POST" and rest.startswith("/preupload/"):
                return self._send(*hub._preupload(repo_id, json.loads(body or b"{}")))
            if method == "POST" and rest.startswith("/commit/"):
                return self._send(*hub._commit(repo_id, body))
            if method == "GET" and (rest == "" or rest.startswith("/revision/")):
                return self._send(*hub._model_info(repo_id))

        r = _RESOLVE.match(path)
        if r and method in ("GET", "HEAD"):
            repo = hub.repos.get(r.group("repo"))
            if repo is None or r.group("path") not in repo.files:
                return self._send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"},
                                  head=method == "HEAD")
            content = repo.files[r.group("path")]
            etag = '"' + hashlib.sha1(content).hexdigest() + '"'
            return self._send(200, raw=content, head=method == "HEAD",
                              headers={"ETag": etag, "X-Repo-Commit": repo.sha})

        hub.unhandled.append((method, path))
        return self._send(404, {"error": f"fake hub: no route for {method} {path}"}, head=method == "HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")
