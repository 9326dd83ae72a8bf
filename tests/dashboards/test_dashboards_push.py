"""`agentwatch dashboards push` against a local receiver that speaks Grafana's HTTP API shapes.

The receiver keeps folders and dashboards like Grafana does (uid-keyed, version bumped on
every save), answers 401 without the right bearer token and 400 for payloads Grafana would
reject, and logs every request so tests can assert paths, payloads and idempotence.
"""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from agentwatch.dashboards import grafana
from agentwatch.dashboards.push import dashboards_group

TOKEN = "glsa_test_token"


class FakeGrafana:
    def __init__(self, token: str = TOKEN, prefix: str = "") -> None:
        self.token = token
        self.prefix = prefix  # Grafana served under a sub-path (root_url with serve_from_sub_path)
        self.folders: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}  # uid -> {"dashboard": ..., "folderUid": ...}
        self.requests: list[tuple[str, str, object]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append((method, self.path, body))
                if not self.path.startswith(f"{fake.prefix}/api/"):
                    return self._reply(404, {"message": "Not found"})
                path = self.path[len(fake.prefix):]
                if path == "/api/health" and method == "GET":
                    return self._reply(200, {"database": "ok", "version": "11.5.2", "commit": "x"})
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    return self._reply(401, {"message": "Unauthorized"})
                status, reply = fake.route(method, path, body)
                self._reply(status, reply)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, method: str, path: str, body):
        if path.startswith("/api/folders/") and method == "GET":
            folder = self.folders.get(path.rsplit("/", 1)[1])
            return (200, folder) if folder else (404, {"message": "folder not found"})
        if path == "/api/folders" and method == "POST":
            if set(body) - {"uid", "title", "parentUid"} or not body.get("title"):
                return 400, {"message": "bad folder payload"}
            if body.get("uid") in self.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            folder = {"id": len(self.folders) + 1, "uid": body["uid"], "title": body["title"],
                      "version": 1}
            self.folders[body["uid"]] = folder
            return 200, folder
        if path.startswith("/api/folders/") and method == "PUT":
            folder = self.folders.get(path.rsplit("/", 1)[1])
            if folder is None:
                return 404, {"message": "folder not found"}
            if not body.get("title") or not (body.get("overwrite") or "version" in body):
                return 400, {"message": "title and version or overwrite required"}
            folder.update(title=body["title"], version=folder["version"] + 1)
            return 200, folder
        if path.startswith("/api/dashboards/uid/") and method == "GET":
            stored = self.dashboards.get(path.rsplit("/", 1)[1])
            if stored is None:
                return 404, {"message": "Dashboard not found"}
            return 200, {"dashboard": copy.deepcopy(stored["dashboard"]),
                         "meta": {"folderUid": stored["folderUid"], "slug": "x"}}
        if path == "/api/dashboards/db" and method == "POST":
            return self.save_dashboard(body)
        return 404, {"message": "Not found"}

    def save_dashboard(self, body):
        dashboard = body.get("dashboard")
        if not isinstance(dashboard, dict) or not (dashboard.get("uid") and dashboard.get("title")):
            return 400, {"message": "dashboard with uid and title required"}
        if body.get("folderUid") not in self.folders:
            return 400, {"message": "folder not found"}
        stored = self.dashboards.get(dashboard["uid"])
        if stored is not None and not body.get("overwrite") and \
                dashboard.get("version") != stored["dashboard"]["version"]:
            return 412, {"message": "version-mismatch", "status": "version-mismatch"}
        version = 1 if stored is None else stored["dashboard"]["version"] + 1
        db_id = len(self.dashboards) + 1 if stored is None else stored["dashboard"]["id"]
        saved = {**dashboard, "id": db_id, "version": version}
        self.dashboards[dashboard["uid"]] = {"dashboard": saved, "folderUid": body["folderUid"]}
        return 200, {"id": db_id, "uid": dashboard["uid"], "status": "success",
                     "version": version, "url": f"/d/{dashboard['uid']}/x"}

    def writes(self):
        return [(m, p) for m, p, _ in self.requests if m != "GET"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake():
    server = FakeGrafana()
    yield server
    server.close()


def push(url: str, token: str = TOKEN, *extra: str):
    return CliRunner().invoke(dashboards_group, ["push", "--url", url, "--token", token, *extra])


def test_first_push_creates_folder_and_dashboards(fake):
    result = push(fake.url)
    assert result.exit_code == 0, result.output
    expected = {d["uid"]: d for d in grafana.all_dashboards()}
    assert fake.folders == {"agentwatch": {"id": 1, "uid": "agentwatch", "title": "agentwatch",
                                           "version": 1}}
    assert fake.writes() == [("POST", "/api/folders")] + [("POST", "/api/dashboards/db")] * 4
    for method, path, body in fake.requests:
        if path == "/api/dashboards/db":
            assert body["folderUid"] == "agentwatch" and body["overwrite"] is True
            assert body["dashboard"]["id"] is None and body["message"]
    assert set(fake.dashboards) == set(expected)
    for uid, stored in fake.dashboards.items():
        saved = {k: v for k, v in stored["dashboard"].items() if k not in ("id", "version")}
        assert saved == expected[uid]
    assert "created 4" in result.output


def test_second_push_writes_nothing_and_edits_are_reverted(fake):
    assert push(fake.url).exit_code == 0
    before = len(fake.writes())
    result = push(fake.url)
    assert result.exit_code == 0, result.output
    assert len(fake.writes()) == before, "an unchanged push must not create Grafana versions"
    assert "unchanged 4" in result.output
    # Someone edits one dashboard in the UI and renames the folder: the next push restores both.
    fake.dashboards["agentwatch-gpu"]["dashboard"]["title"] = "edited by hand"
    fake.folders["agentwatch"]["title"] = "renamed"
    result = push(fake.url)
    assert result.exit_code == 0, result.output
    assert fake.writes()[before:] == [("PUT", "/api/folders/agentwatch"),
                                      ("POST", "/api/dashboards/db")]
    assert fake.dashboards["agentwatch-gpu"]["dashboard"]["title"] == "agentwatch / GPU"
    assert fake.dashboards["agentwatch-gpu"]["dashboard"]["version"] == 2
    assert fake.folders["agentwatch"]["title"] == "agentwatch"
    assert "updated 1" in result.output


def test_sub_path_url_reaches_api_under_it():
    # Grafana behind a reverse proxy at /grafana: the API lives at /grafana/api/...
    server = FakeGrafana(prefix="/grafana")
    try:
        result = push(f"{server.url}/grafana/")
        assert result.exit_code == 0, result.output
        assert len(server.dashboards) == 4
        assert all(path.startswith("/grafana/api/") for _, path, _ in server.requests)
    finally:
        server.close()


def test_bad_token_is_reported_as_auth_failure(fake):
    result = push(fake.url, "wrong")
    assert result.exit_code == 1
    assert "rejected the token (HTTP 401)" in result.output
    assert fake.dashboards == {} and fake.folders == {}


def test_missing_token_is_reported(fake, monkeypatch):
    monkeypatch.delenv("AGENTWATCH_GRAFANA_TOKEN", raising=False)
    result = CliRunner().invoke(dashboards_group, ["push", "--url", fake.url])
    assert result.exit_code == 1 and "no Grafana token" in result.output
    assert fake.requests == []


def test_token_from_environment(fake):
    result = CliRunner().invoke(dashboards_group, ["push"], env={
        "AGENTWATCH_GRAFANA_URL": fake.url, "AGENTWATCH_GRAFANA_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    assert len(fake.dashboards) == 4


def test_forbidden_token_is_reported(fake):
    fake.route = lambda method, path, body: (403, {"message": "Access denied"})
    result = push(fake.url)
    assert result.exit_code == 1 and "HTTP 403" in result.output and "Editor" in result.output


def test_wrong_urls_are_reported():
    from agentwatch.broker import free_port

    closed = push(f"http://127.0.0.1:{free_port()}")
    assert closed.exit_code == 1 and "cannot connect to Grafana" in closed.output

    class NotGrafana(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            data = b"<html>not here</html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotGrafana)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = push(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 1
    assert "does not look like Grafana" in result.output and "HTTP 404" in result.output

    for bad in ("grafana:3000", "ftp://grafana", "http://grafana:3000/api"):
        result = push(bad)
        assert result.exit_code == 1 and "Grafana base URL" in result.output, bad


def test_export_writes_provisioning_json(tmp_path):
    result = CliRunner().invoke(dashboards_group, ["export", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert written == {d["uid"]: d for d in grafana.all_dashboards()}
