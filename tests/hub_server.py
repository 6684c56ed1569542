"""A small Hugging Face Hub-compatible HTTP server for offline tests (stdlib ``http.server`` in a thread).

It implements the routes huggingface_hub 2.x uses for: ``whoami``, ``create_repo``, README YAML validation,
``create_commit`` (``preupload``, NDJSON ``commit`` with regular and LFS files, the LFS batch API and a basic
PUT transfer), ``repo_info`` (with ``revision``), tree listing and file ``resolve`` (HEAD and GET, ranges),
which is enough for ``AutoModelForCausalLM.from_pretrained(repo_id)``, ``snapshot_download`` and
``ModelCard.load(repo_id)`` with ``HF_ENDPOINT`` pointing here and ``HF_HUB_DISABLE_XET=1``.

Tokens are registered with :meth:`FakeHub.add_token`; writes need a write token for the repo's namespace.
:meth:`FakeHub.fail` injects faults (an HTTP status or a dropped connection) into matching requests.
A commit is applied all-or-nothing, so tests can assert that a failed push left no partial commit.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
_LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".pt", ".gguf")
_LFS_MIN_SIZE = 1024 * 1024  # files larger than this go through LFS whatever their name


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Account:
    user: str
    write: bool = True
    orgs: tuple[str, ...] = ()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    # an HTTP status; "drop": close the connection without handling the request; "drop_after": handle it,
    # then close the connection without answering
    action: int | str
    remaining: int


class _Reply(Exception):
    """Raised by route handlers to answer with an error status."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, extra: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra or {}


class FakeHub:
    """In-memory Hub state plus the HTTP server that serves it."""

    def __init__(self, sock: socket.socket | None = None):
        self.lock = threading.RLock()
        self.accounts: dict[str, Account] = {}
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int | str]] = []
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=sock is None)
        if sock is not None:
            self.server.socket.close()
            self.server.socket = sock
            self.server.server_address = sock.getsockname()
            self.server.server_activate()
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        if self._thread is None:
            self._thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server.server_close()

    # -- test controls ----------------------------------------------------------------------------------
    def add_token(self, token: str, user: str, write: bool = True, orgs: tuple[str, ...] = ()) -> None:
        with self.lock:
            self.accounts[token] = Account(user, write, tuple(orgs))

    def fail(self, method: str, path_regex: str, action: int | str = 500, times: int = 1) -> None:
        """Answer the next ``times`` requests matching ``method`` and ``path_regex`` with ``action``."""
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(path_regex), action, times))

    def reset(self) -> None:
        with self.lock:
            self.accounts.clear()
            self.repos.clear()
            self.lfs_store.clear()
            self.faults.clear()
            self.log.clear()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            commit = self.repos[repo_id].at(revision)
            return {path: f.data for path, f in commit.files.items()}

    def commits(self, repo_id: str) -> list[Commit]:
        with self.lock:
            return list(self.repos[repo_id].commits) if repo_id in self.repos else []

    # -- state changes (called by the handler, under the lock) -------------------------------------------
    def _take_fault(self, method: str, path: str) -> int | str | None:
        with self.lock:
            for fault in self.faults:
                if fault.remaining > 0 and fault.method == method and fault.pattern.search(path):
                    fault.remaining -= 1
                    return fault.action
        return None

    def _new_commit(self, repo: Repo, message: str, files: dict[str, StoredFile]) -> Commit:
        parent = repo.commits[-1].oid if repo.commits else ""
        digest = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{message}\n{len(repo.commits)}".encode())
        for path in sorted(files):
            digest.update(f"{path}:{files[path].oid}\n".encode())
        commit = Commit(digest.hexdigest(), message, files)
        repo.commits.append(commit)
        return commit


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        return

    # -- plumbing ---------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if getattr(self, "_cached_body", None) is not None:
            return self._cached_body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            body = b"".join(chunks)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._cached_body = body
        return body

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body() or b"{}")
        except json.JSONDecodeError:
            raise _Reply(400, "malformed JSON body") from None

    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, ctype: str = ""
    ) -> None:
        if getattr(self, "_lose_response", False):
            # The request was handled, but the answer never reaches the client (a reset after the fact).
            self.close_connection = True
            self.hub.log.append((self.command, self.path, f"{status}, answer dropped"))
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.hub.log.append((self.command, self.path, status))

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers, "application/json")

    def _account(self) -> Account | None:
        header = self.headers.get("Authorization", "")
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        account = self.hub.accounts.get(token)
        if account is None:
            raise _Reply(401, "Invalid credentials in Authorization header")
        return account

    def _writer(self, namespace: str) -> Account:
        account = self._account()
        if account is None:
            raise _Reply(401, "Invalid username or password.")
        if not account.write or namespace not in (account.user, *account.orgs):
            raise _Reply(403, f"You don't have the rights to write to {namespace!r} with this token")
        return account

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        if write:
            self._writer(repo_id.split("/")[0])
        repo = self.hub.repos.get(repo_id)
        account = self._account()
        visible = repo is not None and (
            not repo.private
            or (account is not None and repo_id.split("/")[0] in (account.user, *account.orgs))
        )
        if not visible:
            raise _Reply(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.at(unquote(revision))
        if commit is None:
            raise _Reply(404, f"Invalid rev id: {revision}", {"X-Error-Code": "RevisionNotFound"})
        return commit

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        # Always read the whole request first: keep-alive needs it, and closing a socket with unread data
        # would reset the connection while the client is still sending. (One handler serves every request of
        # a keep-alive connection, so the previous request's body is forgotten first.)
        self._cached_body = None
        self._body()
        fault = self.hub._take_fault(self.command, path)
        self._lose_response = fault == "drop_after"
        if fault is not None and not self._lose_response:
            if fault == "drop":
                self.close_connection = True
                self.hub.log.append((self.command, self.path, "drop"))
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._json(
                int(fault), {"error": f"injected failure {fault}"}, {"X-Error-Message": "injected failure"}
            )
            return
        try:
            with self.hub.lock:
                for method, pattern, handler in _ROUTES:
                    if method == self.command or (method == "GET" and self.command == "HEAD"):
                        match = re.fullmatch(pattern, path)
                        if match:
                            handler(self, query=query, **match.groupdict())
                            return
                raise _Reply(404, f"no route for {self.command} {path}")
        except _Reply as reply:
            headers = {"X-Error-Message": reply.message, **reply.headers}
            self._json(reply.status, {"error": reply.message, **reply.extra}, headers)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # -- routes -----------------------------------------------------------------------------------------
    def whoami(self, query) -> None:
        account = self._account()
        if account is None:
            raise _Reply(401, "Invalid username or password.")
        role = "write" if account.write else "read"
        self._json(
            200,
            {
                "type": "user",
                "name": account.user,
                "fullname": account.user,
                "orgs": [{"name": org, "type": "org"} for org in account.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
            },
        )

    def create_repo(self, query) -> None:
        payload = self._json_body()
        if payload.get("type", "model") != "model":
            raise _Reply(400, "this test hub only hosts models")
        account = self._account()
        namespace = payload.get("organization") or (account.user if account else "")
        name = payload.get("name") or ""
        if not re.fullmatch(r"[\w.\-]{1,96}", name):
            raise _Reply(400, f"invalid repo name {name!r}")
        self._writer(namespace)
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.endpoint}/{repo_id}"
        if repo_id in self.hub.repos:
            raise _Reply(
                409, "You already created this model repo", {"X-Error-Code": "RepoExists"}, {"url": url}
            )
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        gitattributes = "".join(
            f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in _LFS_SUFFIXES
        )
        self.hub._new_commit(
            repo, "initial commit", {".gitattributes": StoredFile(gitattributes.encode(), False)}
        )
        self.hub.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, query) -> None:
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, query, repo: str, rev: str) -> None:
        stored = self._commit_at(self._repo(repo, write=True), rev).files
        files = []
        for entry in self._json_body().get("files", []):
            lfs = entry["path"].endswith(_LFS_SUFFIXES) or entry["size"] > _LFS_MIN_SIZE
            existing = stored.get(entry["path"])
            files.append(
                {
                    "path": entry["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing is not None and existing.lfs == lfs else None,
                }
            )
        self._json(200, {"files": files})

    def lfs_batch(self, query, repo: str) -> None:
        self._repo(repo, write=True)
        objects = []
        for obj in self._json_body().get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_store:
                entry["actions"] = {"upload": {"href": f"{self.hub.endpoint}/__lfs__/{obj['oid']}"}}
            objects.append(entry)
        self._json(
            200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}
        )

    def lfs_put(self, query, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Reply(400, "uploaded content does not match its sha256")
        self.hub.lfs_store[oid] = data
        self._send(200)

    def commit(self, query, repo: str, rev: str) -> None:
        target = self._repo(repo, write=True)
        if unquote(rev) != "main":
            raise _Reply(400, "this test hub only commits to main")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != target.head.oid:
            raise _Reply(412, "parentCommit is not the head of main")
        files = dict(target.head.files)  # applied to a copy: a bad operation leaves the repo untouched
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.hub.lfs_store.get(value["oid"])
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise _Reply(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(data, True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: f for p, f in files.items() if not p.startswith(prefix)}
            else:
                raise _Reply(400, f"unsupported commit operation {key!r}")
        commit = self.hub._new_commit(target, header.get("summary", ""), files)
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.endpoint}/{repo}/commit/{commit.oid}",
                "commitMessage": commit.message,
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def model_info(self, query, repo: str, rev: str = "main") -> None:
        target = self._repo(repo)
        commit = self._commit_at(target, rev)
        self._json(
            200,
            {
                "_id": hashlib.md5(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "private": target.private,
                "disabled": False,
                "gated": False,
                "lastModified": _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z"),
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            },
        )

    def tree(self, query, repo: str, rev: str, path: str | None = None) -> None:
        commit = self._commit_at(self._repo(repo), rev)
        prefix = (unquote(path).strip("/") + "/") if path else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for name, stored in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entry = {
                "type": "file",
                "oid": git_blob_sha1(stored.data),
                "size": len(stored.data),
                "path": name,
            }
            if stored.lfs:
                entry["lfs"] = {"oid": stored.oid, "size": len(stored.data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        if prefix and not entries:
            raise _Reply(404, f"{path} does not exist", {"X-Error-Code": "EntryNotFound"})
        self._json(200, entries)

    def resolve(self, query, repo: str, rev: str, path: str) -> None:
        commit = self._commit_at(self._repo(repo), rev)
        stored = commit.files.get(unquote(path))
        if stored is None:
            raise _Reply(
                404, "Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.oid}
            )
        data = stored.data
        etag = f'"{stored.oid}"'
        headers = {"X-Repo-Commit": commit.oid, "ETag": etag, "Accept-Ranges": "bytes"}
        if stored.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))})
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and self.command == "GET":
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, "application/octet-stream")


_ROUTES = [
    ("GET", r"/api/whoami-v2", _Handler.whoami),
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", _Handler.commit),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", _Handler.tree),
    ("GET", rf"/api/models/{_REPO}", _Handler.model_info),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/__lfs__/(?P<oid>[0-9a-f]{64})", _Handler.lfs_put),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _Handler.resolve),
]
