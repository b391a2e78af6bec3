"""A local HTTP server speaking the few Kubernetes API endpoints the train service's Job backend uses.

It is not a cluster: it stores Job objects in memory, lets a test set their status, streams watch
events when they change, and records every request so tests can assert the exact calls made.

Deletion follows the API server: a ``Background`` (or orphaning) delete removes the Job at once; a
``Foreground`` one marks it (``deletionTimestamp``, the ``foregroundDeletion`` finalizer) and removes it
``deletion_delay_s`` later, when its pods would have terminated. Meanwhile it can still be read, and
creating a Job of the same name is a conflict.
"""
from __future__ import annotations

import contextlib
import json
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

_JOBS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?(/status)?$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: dict | None


@dataclass
class FakeKube:
    jobs: dict[tuple[str, str], dict] = field(default_factory=dict)
    pods: list[dict] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    deletion_delay_s: float = 0.0
    _watchers: list[queue.Queue] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_status(self, namespace: str, name: str, status: dict) -> None:
        with self._lock:
            job = self.jobs[(namespace, name)]
            job["status"] = status
            self._notify("MODIFIED", job)

    def _notify(self, kind: str, job: dict) -> None:
        for q in list(self._watchers):
            q.put({"type": kind, "object": job})

    def _remove(self, namespace: str, name: str) -> None:
        with self._lock:
            job = self.jobs.pop((namespace, name), None)
            if job is not None:
                self._notify("DELETED", job)


def _handler(state: FakeKube):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def _body(self) -> dict | None:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length)) if length else None

        def _send(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _not_found(self, name: str) -> None:
            self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                             "message": f'jobs.batch "{name}" not found', "code": 404})

        def _record(self) -> tuple[str, dict[str, str], dict | None]:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            body = self._body() if self.command in ("POST", "DELETE", "PUT", "PATCH") else None
            state.requests.append(Request(self.command, url.path, query, body))
            return url.path, query, body

        def do_POST(self):
            path, _, body = self._record()
            m = _JOBS.match(path)
            if not m or m.group(2):
                return self._send(404, {})
            ns, name = m.group(1), body["metadata"]["name"]
            with state._lock:
                if (ns, name) in state.jobs:
                    return self._send(409, {"kind": "Status", "reason": "AlreadyExists", "code": 409})
                job = {**body, "metadata": {**body["metadata"], "namespace": ns, "uid": f"uid-{name}"},
                       "status": {}}
                state.jobs[(ns, name)] = job
                state._notify("ADDED", job)
            self._send(201, job)

        def do_GET(self):
            path, query, _ = self._record()
            if m := _PODS.match(path):
                selector = query.get("labelSelector", "")
                items = [p for p in state.pods if _matches(p, selector)]
                return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            m = _JOBS.match(path)
            if not m:
                return self._send(404, {})
            ns, name = m.group(1), m.group(2)
            if name:
                job = state.jobs.get((ns, name))
                return self._send(200, job) if job else self._not_found(name)
            if query.get("watch") in ("true", "True", "1"):
                return self._watch(ns, query)
            items = [j for (n, _), j in state.jobs.items() if n == ns]
            self._send(200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": items})

        def _watch(self, ns: str, query: dict[str, str]) -> None:
            wanted = query.get("fieldSelector", "").removeprefix("metadata.name=")
            q: queue.Queue = queue.Queue()
            state._watchers.append(q)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            timeout = float(query.get("timeoutSeconds", 5))
            try:
                while True:
                    try:
                        event = q.get(timeout=timeout)
                    except queue.Empty:
                        break
                    if event["object"]["metadata"]["name"] != wanted:
                        continue
                    line = (json.dumps(event) + "\n").encode()
                    self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                state._watchers.remove(q)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(b"0\r\n\r\n")

        def do_DELETE(self):
            path, query, body = self._record()
            m = _JOBS.match(path)
            if not m or not m.group(2):
                return self._send(404, {})
            ns, name = m.group(1), m.group(2)
            policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy") or "Background"
            with state._lock:
                job = state.jobs.get((ns, name))
                if job is None:
                    return self._not_found(name)
                if policy != "Foreground" or not state.deletion_delay_s:
                    state.jobs.pop((ns, name))
                    state._notify("DELETED", job)
                    return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                if "deletionTimestamp" not in job["metadata"]:
                    job["metadata"]["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    job["metadata"]["finalizers"] = ["foregroundDeletion"]
                    state._notify("MODIFIED", job)
                    timer = threading.Timer(state.deletion_delay_s, state._remove, (ns, name))
                    timer.daemon = True
                    timer.start()
            self._send(200, job)

    return Handler


def _matches(obj: dict, selector: str) -> bool:
    labels = obj.get("metadata", {}).get("labels", {})
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKubeServer:
    def __init__(self):
        self.state = FakeKube()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FakeKubeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
