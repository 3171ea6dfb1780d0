"""A minimal Hugging Face Hub on 127.0.0.1, enough for `huggingface_hub.hf_hub_download` (set `HF_ENDPOINT`).

`hf_hub_download` sends `HEAD {endpoint}/{repo}/resolve/{revision}/{file}` and reads `X-Repo-Commit` (the commit the
revision resolves to), `ETag` (the file's blob id) and `Content-Length`, then `GET`s the same URL. Errors carry
`X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`; a missing file's 404 also names the commit, so
the client records that the file does not exist). Revisions are branch or tag names, or full commit hashes.
"""
from __future__ import annotations

import hashlib
import http.server
import threading
import urllib.parse
from functools import partial
from typing import Dict, List, Tuple


class HubRepos:
    """Repositories: `commit(repo, files, refs)` adds a commit (files: path -> bytes) and points `refs` at it."""

    def __init__(self) -> None:
        self.commits: Dict[str, Dict[str, Dict[str, bytes]]] = {}
        self.refs: Dict[str, Dict[str, str]] = {}
        self.requests: List[Tuple[str, str]] = []

    def commit(self, repo: str, files: Dict[str, bytes], refs=("main",)) -> str:
        sha = hashlib.sha1(repr((repo, len(self.commits.get(repo, {})), sorted(files))).encode()).hexdigest()
        self.commits.setdefault(repo, {})[sha] = dict(files)
        for ref in refs:
            self.refs.setdefault(repo, {})[ref] = sha
        return sha


class _Handler(http.server.BaseHTTPRequestHandler):
    def __init__(self, repos: HubRepos, *args, **kwargs) -> None:
        self.repos = repos
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:
        pass

    def _reply(self, send_body: bool) -> None:
        self.repos.requests.append((self.command, self.path))
        parts = [urllib.parse.unquote(p) for p in urllib.parse.urlsplit(self.path).path.strip("/").split("/")]
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "RepoNotFound")
        repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in self.repos.commits:
            return self._error(404, "RepoNotFound")
        sha = self.repos.refs[repo].get(revision, revision)
        if sha not in self.repos.commits[repo]:
            return self._error(404, "RevisionNotFound")
        files = self.repos.commits[repo][sha]
        if filename not in files:
            return self._error(404, "EntryNotFound", {"X-Repo-Commit": sha})
        body = files[filename]
        self.send_response(200)
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _error(self, status: int, code: str, headers: Dict[str, str] = None) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._reply(send_body=False)

    def do_GET(self) -> None:
        self._reply(send_body=True)


def start_hub(repos: HubRepos):
    """Serve `repos` on 127.0.0.1 in a thread; returns (server, endpoint URL). Call `server.shutdown()`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, repos))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
