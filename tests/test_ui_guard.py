"""The web guard in front of the REAL Dagster webserver app of this project's workspace.

The app is what ``python -m dagster_project.launcher ui`` serves: dagster-webserver's Starlette app for
``workspace.yaml`` (code location ``dagster_project.definitions``) on a temporary ``DAGSTER_HOME``,
wrapped in :class:`ddr_core.web_guard.WebGuard`. Requests go through Starlette's TestClient; whether a
mutation ran is read from the instance (``launchRun`` of ``provision_models`` queues a run: the instance
uses the QueuedRunCoordinator and no daemon runs here, so nothing executes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest

pytest.importorskip("httpx2", reason="starlette.testclient needs httpx2 (a huggingface_hub dependency)")
import dagster as dg  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from dagster_project.launcher import build_ui_app, ui_process_context  # noqa: E402
from ddr_core.web_guard import GuardConfig  # noqa: E402
from tests.timing import children_cpu_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = "http://127.0.0.1:3000"
SAME_ORIGIN = {"Origin": BASE}
EVIL = "http://evil.example"
WS = "ws://127.0.0.1:3000/graphql"
TOKEN = "test-token-0123456789abcdef"
LAUNCH = """mutation Launch($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """``(instance, process context, code location name)`` of workspace.yaml on a temporary instance."""
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copyfile(ROOT / "dagster_project" / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        with ui_process_context(instance, ROOT / "workspace.yaml", read_only=False) as context:
            with TestClient(build_ui_app(context, GuardConfig(bind_host="127.0.0.1", port=3000)),
                            base_url=BASE) as client:
                response = client.post("/graphql", headers=SAME_ORIGIN, json={
                    "query": "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }"})
                location = response.json()["data"]["workspaceOrError"]["locationEntries"][0]["name"]
            yield instance, context, location


@pytest.fixture(scope="module")
def client(workspace):
    _instance, context, _location = workspace
    with TestClient(build_ui_app(context, GuardConfig(bind_host="127.0.0.1", port=3000)), base_url=BASE) as client:
        yield client


def _launch_variables(location: str, partition: str = "tiny") -> dict:
    return {"p": {"selector": {"repositoryLocationName": location, "repositoryName": "__repository__",
                               "jobName": "provision_models"},
                  "mode": "default",
                  "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]}}}


def _runs(instance) -> int:
    return instance.get_runs_count()


def test_unguarded_webserver_runs_a_mutation_sent_as_get(workspace) -> None:
    """The threat is real: dagster-webserver's own app (what a bare `dagster dev` serves) executes a
    mutation from a GET query string, as an <img src> on any page would send it."""
    instance, context, location = workspace
    from dagster_webserver.webserver import DagsterWebserver

    before = _runs(instance)
    with TestClient(DagsterWebserver(context).create_asgi_app(), base_url=BASE) as raw:
        response = raw.get("/graphql", params={"query": LAUNCH,
                                               "variables": json.dumps(_launch_variables(location, "sd-v1-4"))})
    assert response.json()["data"]["launchRun"]["__typename"] == "LaunchRunSuccess", response.text
    assert _runs(instance) == before + 1


def test_mutation_over_get_is_refused_and_launches_nothing(workspace, client) -> None:
    instance, _context, location = workspace
    before = _runs(instance)
    params = {"query": LAUNCH, "variables": json.dumps(_launch_variables(location))}
    assert client.get("/graphql", params=params).status_code == 403
    assert client.get("/graphql", params=params, headers=SAME_ORIGIN).status_code == 403
    # anonymous mutation, several operations, a repeated parameter, a document that does not parse
    for query in ("mutation { logTelemetry(action: \"a\", clientTime: \"1\", clientId: \"c\", metadata: \"{}\") "
                  "{ __typename } }",
                  "query A { version } " + LAUNCH,
                  "{ version"):
        assert client.get("/graphql", params={"query": query}).status_code == 403, query
    assert client.get("/graphql?query={version}&query=mutation%20%7BlogTelemetry%7D").status_code == 403
    assert _runs(instance) == before
    # a read over GET still works
    response = client.get("/graphql", params={"query": "{ version }"})
    assert response.status_code == 200 and response.json()["data"]["version"]


def test_form_post_mutation_is_refused(workspace, client) -> None:
    """A cross-site <form method=post> is form-encoded or text/plain: dagster-webserver would read the
    query string (or a 'text/plain;application/json' body as JSON); the guard accepts JSON only."""
    instance, _context, location = workspace
    before = _runs(instance)
    body = {"query": LAUNCH, "variables": json.dumps(_launch_variables(location))}
    assert client.post("/graphql", data=body).status_code == 415
    assert client.post("/graphql", data=body, headers={"Origin": EVIL}).status_code == 403
    assert client.post("/graphql", params=body, content=b"").status_code == 415
    for content_type in ("text/plain;application/json", "text/plain", "multipart/form-data; boundary=x",
                         "application/graphql"):
        response = client.post("/graphql", content=json.dumps(body).encode(),
                               headers={"Content-Type": content_type})
        assert response.status_code == 415, content_type
    assert _runs(instance) == before


def test_json_post_from_a_foreign_origin_is_refused(workspace, client) -> None:
    instance, _context, location = workspace
    before = _runs(instance)
    body = {"query": LAUNCH, "variables": _launch_variables(location)}
    for headers in ({"Origin": EVIL}, {"Origin": "null"}, {"Origin": "http://127.0.0.1:3001"},
                    {"Origin": "https://127.0.0.1:3000"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"}):
        assert client.post("/graphql", json=body, headers=headers).status_code == 403, headers
    assert _runs(instance) == before


def test_rebinding_host_is_refused(workspace, client) -> None:
    """A page on evil.example whose name now resolves to 127.0.0.1 is same-origin with itself: its
    requests carry Host: evil.example:3000, on every request (reads too)."""
    instance, _context, location = workspace
    before = _runs(instance)
    rebound = {"Host": "evil.example:3000", "Origin": "http://evil.example:3000"}
    body = {"query": LAUNCH, "variables": _launch_variables(location)}
    assert client.post("/graphql", json=body, headers=rebound).status_code == 403
    assert client.post("/graphql", json=body, headers={"Host": "evil.example:3000"}).status_code == 403
    assert client.post("/graphql", json={"query": "{ version }"}, headers=rebound).status_code == 403
    assert client.get("/", headers={"Host": "evil.example:3000"}).status_code == 403
    assert client.get("/", headers={"Host": "127.0.0.1:3001"}).status_code == 403
    assert _runs(instance) == before


def test_same_origin_ui_requests_work(workspace, client) -> None:
    instance, _context, location = workspace
    index = client.get("/", headers={"Accept": "text/html"})
    assert index.status_code == 200 and "<html" in index.text.lower()
    assert client.get("/server_info").json()["dagster_webserver_version"]
    for host in ("127.0.0.1:3000", "localhost:3000", "[::1]:3000"):
        response = client.post("/graphql", json={"query": "{ version }"},
                               headers={"Host": host, "Origin": f"http://{host}"})
        assert response.status_code == 200, host
    before = _runs(instance)
    response = client.post("/graphql", headers=SAME_ORIGIN,
                           json={"query": LAUNCH, "variables": _launch_variables(location)})
    assert response.json()["data"]["launchRun"]["__typename"] == "LaunchRunSuccess", response.text
    run_id = response.json()["data"]["launchRun"]["run"]["runId"]
    assert _runs(instance) == before + 1
    run = instance.get_run_by_id(run_id)
    assert run.job_name == "provision_models" and run.tags["dagster/partition"] == "tiny"
    # a non-browser client (no Origin, no Sec-Fetch-Site) on the right Host is not a CSRF vector
    assert client.post("/graphql", json={"query": "{ version }"}).status_code == 200


def test_graphql_websocket_checks_origin_and_host(client) -> None:
    for headers in ({"Origin": EVIL}, {"Origin": "null"}, {"Host": "evil.example:3000", "Origin": BASE}):
        with pytest.raises(WebSocketDisconnect) as refused:
            with client.websocket_connect(WS, subprotocols=["graphql-ws"], headers=headers):
                pass
        assert refused.value.code == 1008, headers
    with client.websocket_connect(WS, subprotocols=["graphql-ws"], headers=SAME_ORIGIN) as ws:
        ws.send_json({"type": "connection_init", "payload": {}})
        assert ws.receive_json()["type"] == "connection_ack"


def test_report_asset_endpoints_check_origin_and_host(workspace, client) -> None:
    instance, _context, _location = workspace
    key = dg.AssetKey("models")
    assert instance.get_latest_materialization_event(key) is None
    for headers in ({"Origin": EVIL}, {"Host": "evil.example:3000"}, {"Sec-Fetch-Site": "cross-site"}):
        for endpoint in ("report_asset_materialization", "report_asset_observation", "report_asset_check"):
            response = client.post(f"/{endpoint}/models", json={}, headers=headers)
            assert response.status_code == 403, (endpoint, headers)
        response = client.post("/report_asset_materialization/models", data={"partition": "x"}, headers=headers)
        assert response.status_code == 403, headers
    assert instance.get_latest_materialization_event(key) is None
    # the endpoint itself still works from this machine's scripts
    assert client.post("/report_asset_materialization/models", json={}).status_code == 200
    assert instance.get_latest_materialization_event(key) is not None


def test_token_mode(workspace) -> None:
    _instance, context, _location = workspace
    guard = GuardConfig(bind_host="127.0.0.1", port=3000, token=TOKEN)
    with TestClient(build_ui_app(context, guard), base_url=BASE) as client:
        assert client.get("/", headers={"Accept": "text/html"}).status_code == 403
        assert client.get("/server_info").status_code == 403
        assert client.post("/graphql", json={"query": "{ version }"}, headers=SAME_ORIGIN).status_code == 403
        assert client.get("/?token=wrong-token-0123456789", headers={"Accept": "text/html"}).status_code == 403
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect(WS, subprotocols=["graphql-ws"], headers=SAME_ORIGIN):
                pass

        # ?token= on a page load: an HttpOnly SameSite=Strict cookie and a reload without the token
        page = client.get(f"/runs?token={TOKEN}&view=list", headers={"Accept": "text/html"})
        assert page.status_code == 200
        cookie = page.headers["set-cookie"]
        assert cookie.startswith(f"ddr_token_3000={TOKEN};")
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and "Path=/" in cookie
        assert 'url=/runs?view=list"' in page.text and TOKEN not in page.text
        # the cookie (kept by the client) lets the UI's own requests through
        assert client.get("/", headers={"Accept": "text/html"}).status_code == 200
        assert client.post("/graphql", json={"query": "{ version }"}, headers=SAME_ORIGIN).status_code == 200
        with client.websocket_connect(WS, subprotocols=["graphql-ws"], headers=SAME_ORIGIN) as ws:
            ws.send_json({"type": "connection_init", "payload": {}})
            assert ws.receive_json()["type"] == "connection_ack"
        # the cookie does not lift the other checks
        assert client.post("/graphql", json={"query": "{ version }"}, headers={"Origin": EVIL}).status_code == 403
        assert client.get("/graphql", params={"query": "mutation { x }"}).status_code == 403
        client.cookies.clear()
        assert client.get("/server_info").status_code == 403
        # scripts: a bearer header or X-DDR-Token
        assert client.get("/server_info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get("/server_info", headers={"X-DDR-Token": TOKEN}).status_code == 200
    # the reload target stays on this server (a path "//evil.example/x" is not a URL of another host)
    messages = anyio.run(_asgi_get, build_ui_app(context, guard), "//evil.example/x", f"token={TOKEN}")
    body = b"".join(m.get("body", b"") for m in messages).decode()
    assert messages[0]["status"] == 200 and 'url=/evil.example/x"' in body, body


async def _asgi_get(app, path: str, query: str) -> list[dict]:
    """The messages ``app`` sends for a GET of ``path`` taken verbatim (TestClient would normalise it)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"127.0.0.1:3000"), (b"accept", b"text/html")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 3000)}
    await app(scope, receive, send)
    return sent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "dagster_project.launcher", "ui"],
    [sys.executable, "-m", "dagster_project.launcher", "dev"],
    [sys.executable, "-m", "dagster_project.launcher", "inspector", "--data-root", "."],
    [sys.executable, "-m", "ddr_core.cli", "inspect", "--data-root", "."],
], ids=["ui", "dev", "inspector", "ddr-inspect"])
def test_a_taken_port_fails_at_once_naming_the_port_and_the_fix(command, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        cpu_start = children_cpu_seconds()
        result = subprocess.run([*command, "--port", str(port)], cwd=ROOT, capture_output=True, text=True,
                                timeout=120, env={**_env(), "DAGSTER_HOME": str(tmp_path / "home")})
        cpu = children_cpu_seconds() - cpu_start
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"port {port}" in result.stderr and "--port" in result.stderr, result.stderr[-2000:]
    assert "Serving" not in result.stderr and "open http" not in result.stderr
    # nothing slow (code location, Streamlit) was started: measured in CPU seconds, which a busy machine does not
    # inflate (a hang is caught by the timeout above)
    assert cpu < 60, f"{cpu:.0f} CPU s to refuse a taken port"
    assert not (tmp_path / "home").exists()  # nor the instance


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DDR_ACCESS_TOKEN"}


def test_no_token_is_refused_off_loopback(tmp_path: Path) -> None:
    port = _free_port()
    result = subprocess.run([sys.executable, "-m", "dagster_project.launcher", "ui", "--host", "0.0.0.0",
                             "--port", str(port), "--no-token"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**_env(), "DAGSTER_HOME": str(tmp_path / "home")})
    assert result.returncode == 2 and "--no-token is refused" in result.stderr, result.stderr[-2000:]


def test_read_only_mode_refuses_launching(workspace) -> None:
    """``--read-only`` (ui_process_context(read_only=True), as the launcher passes it): browsing works,
    a same-origin launch is refused by dagster-webserver and queues nothing."""
    instance, _context, location = workspace
    with ui_process_context(instance, ROOT / "workspace.yaml", read_only=True) as context:
        guard = GuardConfig(bind_host="127.0.0.1", port=3000)
        with TestClient(build_ui_app(context, guard), base_url=BASE) as client:
            assert client.post("/graphql", json={"query": "{ version }"}, headers=SAME_ORIGIN).status_code == 200
            before = _runs(instance)
            response = client.post("/graphql", headers=SAME_ORIGIN,
                                   json={"query": LAUNCH, "variables": _launch_variables(location)})
            assert response.json()["data"]["launchRun"]["__typename"] == "UnauthorizedError", response.text
            assert _runs(instance) == before


def test_launcher_passes_read_only_and_guard_options() -> None:
    from dagster_project.launcher import build_parser, ui_guard_config

    args = build_parser().parse_args(["dev", "--read-only", "--port", "3005", "--allow-host", "localhost:8080",
                                      "--no-token"])
    assert args.read_only and args.port == 3005
    guard = ui_guard_config(args)
    assert guard.token is None and "localhost:8080" in guard.allowed_authorities()
    assert "127.0.0.1:3005" in guard.allowed_authorities()
    assert build_parser().parse_args(["ui"]).token is True  # the token is on unless --no-token


@pytest.fixture(scope="module")
def inspector(tmp_path_factory: pytest.TempPathFactory):
    """``(url, process)`` of ``ddr inspect`` (toy data) with the access token TOKEN."""
    from tests.browser_support import guarded_inspector

    with guarded_inspector(["-m", "ddr_core.cli", "inspect"], tmp_path_factory.mktemp("inspector"), TOKEN,
                           _env()) as served:
        yield served


def _http(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode(errors="replace")


def _ws_status(url: str, headers: dict[str, str]) -> int:
    """101 when the WebSocket handshake succeeds, else the HTTP status of the refusal."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, additional_headers=headers, open_timeout=30, origin=None):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


def test_inspector_needs_the_token_for_pages_data_and_websocket(inspector) -> None:
    """The inspector (Streamlit st.App behind the same guard): nothing, not even its WebSocket (which
    carries the data), is served without the token; ?token= gives the cookie; Origin and Host checked."""
    url, process = inspector
    port = url.rsplit(":", 1)[1]
    html = {"Accept": "text/html"}
    assert _http(f"{url}/", html)[0] == 403
    assert _http(f"{url}/_stcore/health")[0] == 403
    assert _http(f"{url}/_stcore/health", {"X-DDR-Token": TOKEN})[2] == "ok"
    assert _http(f"{url}/_stcore/health", {"X-DDR-Token": TOKEN, "Host": f"evil.example:{port}"})[0] == 403
    ws = url.replace("http://", "ws://") + "/_stcore/stream"
    assert _ws_status(ws, {"Origin": url}) == 403

    status, headers, body = _http(f"{url}/?token={TOKEN}", html)
    cookie = headers["set-cookie"].split(";")[0]
    assert status == 200 and cookie == f"ddr_token_{port}={TOKEN}" and "HttpOnly" in headers["set-cookie"]
    status, _headers, body = _http(f"{url}/", {**html, "Cookie": cookie})
    assert status == 200 and "<html" in body.lower()
    assert _ws_status(ws, {"Origin": url, "Cookie": cookie}) == 101
    assert _ws_status(ws, {"Origin": "http://evil.example", "Cookie": cookie}) == 403
    assert _ws_status(ws, {"Origin": f"http://127.0.0.1:{int(port) + 1}", "Cookie": cookie}) == 403

    # the token is in no process's command line (other users of the machine can read those)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    pids = [process.pid, *map(int, children.read_text().split())] if children.exists() else [process.pid]
    for pid in pids:
        assert TOKEN.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.mark.parametrize("service", ["ui", "dev", "daemon"])
def test_launcher_without_dagster_home_names_the_fix(service) -> None:
    env = {k: v for k, v in _env().items() if k != "DAGSTER_HOME"}
    result = subprocess.run([sys.executable, "-m", "dagster_project.launcher", service,
                             *(["--port", str(_free_port())] if service != "daemon" else [])],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "DAGSTER_HOME is not set" in result.stderr, result.stderr[-2000:]


def test_guard_allows_only_this_servers_names() -> None:
    loopback = GuardConfig(bind_host="127.0.0.1", port=3000).allowed_authorities()
    assert loopback == {"127.0.0.1:3000", "localhost:3000", "[::1]:3000"}
    wildcard = GuardConfig(bind_host="0.0.0.0", port=3000, token=TOKEN,
                           extra_hosts=("ui.example.org", "tunnel:8080")).allowed_authorities()
    assert {"127.0.0.1:3000", f"{socket.gethostname().lower()}:3000", "ui.example.org:3000",
            "tunnel:8080"} <= wildcard
    assert "evil.example:3000" not in wildcard
    with pytest.raises(ValueError):
        GuardConfig(bind_host="127.0.0.1", port=3000, token="short")
    with pytest.raises(ValueError):
        GuardConfig(bind_host="127.0.0.1", port=3000, extra_hosts=("bad host/",))


def test_ddr_inspect_stopped_with_sigterm_takes_streamlit_down(tmp_path: Path) -> None:
    """`ddr inspect` killed with SIGTERM (kill, systemd, the end of a cluster job) stops the Streamlit server it
    started: nothing is left listening on the port."""

    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "ddr_core.cli", "inspect", "--data-root", str(tmp_path),
                                "--port", str(port), "--no-token"], cwd=ROOT, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        with socket.socket() as probe:
            probe.settimeout(1)
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        deadline = time.monotonic() + 120
        while not listening():
            assert process.poll() is None and time.monotonic() < deadline, "the inspector never started"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) != 0
        deadline = time.monotonic() + 30
        while listening() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not listening(), "Streamlit is still listening after `ddr inspect` was stopped"
    finally:
        if process.poll() is None:
            process.kill()
