"""Real headless Chromium on the guarded Dagster UI started by the launcher (``make dev``'s path).

``python -m dagster_project.launcher ui`` runs as a subprocess on a free port with a temporary
``DAGSTER_HOME`` and a fixed access token. The browser opens the printed token URL, materializes the
``models`` asset's ``tiny`` partition through the UI's own dialog (the run is queued in the instance: no
daemon runs, nothing executes), and then loads a page from ANOTHER origin (a second local HTTP server)
that tries every cross-site way to launch a run: ``<img src=...graphql?query=mutation...>``, form POSTs
(url-encoded, with the query in the action URL; text/plain with a JSON body), a GET form, a no-cors
fetch -- without the token and, as if the attacker knew it, with ``?token=``. The instance must show no
new run, and the guard's log must show it refused those requests (they reached the server).
Screenshots go to ``test-artifacts/``. Same skip rules as tests/test_browser.py. About a minute.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.browser_support import (
    CHROMEDRIVER,
    CHROMIUM,
    free_port,
    headless_chromium,
    screenshot,
    settled,
    visible,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "browser-test-token-0123456789"
LOCATION = "dagster_project.definitions"  # code location name of workspace.yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="BROWSER TESTS SKIPPED: chromium / chromedriver not installed "
               "(apt-get install -y chromium chromium-driver)",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="BROWSER TESTS SKIPPED: pip install selenium")
import dagster as dg  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

LAUNCH = ("mutation Launch($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename } }")
LAUNCH_VARIABLES = json.dumps({"p": {
    "selector": {"repositoryLocationName": LOCATION, "repositoryName": "__repository__",
                 "jobName": "provision_models"},
    "mode": "default", "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "sd-v1-4"}]}}})




@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory):
    """``(url, instance, log path)`` of the guarded UI started as ``make dev`` starts it (without the daemon)."""
    port = free_port()
    home = tmp_path_factory.mktemp("dagster_home")
    (home / ".nux").mkdir()  # the "Join the Dagster community" prompt was seen (dagster._core.nux)
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n", encoding="utf-8")
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    env = {**os.environ, "DAGSTER_HOME": str(home), "DDR_ACCESS_TOKEN": TOKEN}
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "dagster_project.launcher", "ui", "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            request = urllib.request.Request(f"{url}/server_info", headers={"X-DDR-Token": TOKEN})
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the UI did not start: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        assert f"open {url}/?token={TOKEN}" in log.read_text(errors="replace")
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield url, instance, log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # the code server it started, if still there (the session is ours alone)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def driver():
    with headless_chromium() as browser:
        yield browser




def _click(wait: WebDriverWait, xpath: str) -> None:
    """Click the element at ``xpath`` once it is there and clickable (React re-renders replace nodes)."""
    def attempt(browser) -> bool:
        try:
            browser.find_element(By.XPATH, xpath).click()
            return True
        except WebDriverException:
            return False

    wait.until(attempt, message=f"could not click {xpath}")


def _runs(instance) -> list:
    return list(instance.get_runs())


def test_guarded_ui_loads_and_launches_a_materialization(driver, ui) -> None:
    url, instance, log = ui
    wait = WebDriverWait(driver, 180, poll_frequency=0.5)  # generous: the UI loads slowly on a busy 2-core machine
    driver.get(f"{url}/?token={TOKEN}")
    wait.until(lambda d: "token=" not in d.current_url and d.find_elements(By.XPATH, "//a[contains(., 'Runs')]"))
    cookie = next(c for c in driver.get_cookies() if c["name"] == f"ddr_token_{url.rsplit(':', 1)[1]}")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert TOKEN not in driver.execute_script("return document.cookie;")

    driver.get(f"{url}/assets/models")

    def materialize_enabled(browser) -> bool:
        """The code location loads in the background (importing torch takes a while on a busy machine): until
        it has, the asset shows as external with a disabled button; reload until the button is enabled."""
        if browser.find_elements(By.XPATH, "//button[contains(., 'Materialize') and not(@disabled)]"):
            return True
        if time.monotonic() - materialize_enabled.reloaded > 10:
            browser.refresh()
            materialize_enabled.reloaded = time.monotonic()
        return False

    materialize_enabled.reloaded = time.monotonic()
    wait.until(materialize_enabled, message="the models asset never became materializable (code location not loaded?)")
    screenshot(driver, "ui_guard_asset_models.png")
    _click(wait, "//button[contains(., 'Materialize')]")
    _click(wait, "//*[contains(text(), 'Select a partition')]")
    _click(wait, "//span[normalize-space(text())='tiny']")
    # with several partitions the picker is a checkbox list that stays open over the launch button: close it by
    # clicking the dialog's title
    if driver.find_elements(By.XPATH, "//input[@placeholder='Filter partitions']"):
        _click(wait, "//*[contains(text(), 'Launch runs to materialize')]")
    wait.until(lambda d: d.find_elements(By.XPATH, "//button[normalize-space()='Launch 1 run']"))
    screenshot(driver, "ui_guard_launch_dialog.png")
    before = len(_runs(instance))
    _click(wait, "//button[normalize-space()='Launch 1 run']")
    deadline = time.monotonic() + 120  # generous: a busy machine
    while len(_runs(instance)) == before and time.monotonic() < deadline:
        time.sleep(0.5)
    runs = _runs(instance)
    assert len(runs) == before + 1, "the UI's launch did not reach the instance"
    assert runs[0].tags.get("dagster/partition") == "tiny" and runs[0].asset_selection == {dg.AssetKey("models")}

    driver.get(f"{url}/runs")
    wait.until(lambda d: runs[0].run_id[:8] in d.page_source)
    screenshot(driver, "ui_guard_runs.png")
    refused = [line for line in log.read_text(errors="replace").splitlines() if "refused" in line]
    assert not refused, f"the guard refused the UI's own requests: {refused}"


def _attack_page(target: str) -> str:
    """A page on another origin trying every cross-site way to launch a run on ``target``."""
    query = urlencode({"query": LAUNCH, "variables": LAUNCH_VARIABLES})
    with_token = f"{query}&{urlencode({'token': TOKEN})}"
    text_plain_name = json.dumps({"query": LAUNCH, "variables": json.loads(LAUNCH_VARIABLES), "pad": ""})[:-2]
    body = json.dumps({"query": LAUNCH, "variables": json.loads(LAUNCH_VARIABLES)})
    forms = []
    for index, params in enumerate((query, with_token)):
        forms.append(f'<form target="frame" method="post" action="{target}/graphql?{params}">'
                     f'<input name="query" value="{LAUNCH}"></form>')
        forms.append(f'<form target="frame" method="post" enctype="text/plain" action="{target}/graphql?'
                     f'{"token=" + TOKEN if index else ""}"><input name=\'{text_plain_name}\' value=\'"}}\'></form>')
        forms.append(f'<form target="frame" method="get" action="{target}/graphql">'
                     + "".join(f'<input type="hidden" name="{k}" value=\'{v}\'>' for k, v in
                               (("query", LAUNCH), ("variables", LAUNCH_VARIABLES), ("token", TOKEN if index else "")))
                     + "</form>")
    return f"""<!doctype html><html><body><h1>innocent page</h1>
<img src="{target}/graphql?{query}"><img src="{target}/graphql?{with_token}">
<iframe name="frame"></iframe>{''.join(forms)}
<script>
window.done = 0;
const forms = Array.from(document.forms);
forms.forEach((form, i) => setTimeout(() => form.submit(), 300 * i));
for (const suffix of ["", "?token={TOKEN}"]) {{
  fetch("{target}/graphql" + suffix, {{method: "POST", mode: "no-cors", credentials: "include",
        headers: {{"Content-Type": "text/plain;application/json"}}, body: {json.dumps(body)}}})
    .catch(() => null).finally(() => window.done++);
}}
setTimeout(() => window.done += 100, 300 * forms.length + 1500);
</script></body></html>"""


def test_a_page_from_another_origin_cannot_launch_runs(driver, ui, tmp_path: Path) -> None:
    url, instance, log = ui
    driver.get(f"{url}/?token={TOKEN}")  # the victim's browser holds the UI's cookie
    WebDriverWait(driver, 60).until(lambda d: "token=" not in d.current_url)
    (tmp_path / "attack.html").write_text(_attack_page(url), encoding="utf-8")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    before = len(_runs(instance))
    refusals: dict[str, list[str]] = {}
    try:
        # 127.0.0.1:<other port> is another origin but the SAME SITE (ports do not separate sites), so the
        # browser sends the SameSite=Strict cookie: only the GraphQL/Origin checks stop this page. From
        # localhost (another site) the cookie stays home and the token check refuses first.
        for host, expected in (("127.0.0.1", _same_site_refused), ("localhost", _cross_site_refused)):
            seen = len(_refusals(log))
            driver.get(f"http://{host}:{server.server_address[1]}/attack.html")
            WebDriverWait(driver, 90).until(lambda d: d.execute_script("return window.done;") >= 102)
            # the browser has sent everything; the server logs each refusal as it handles the request: wait until
            # the refusals asserted below are all in the log (a fixed sleep lost this race on a busy machine)
            deadline = time.monotonic() + 60
            while not expected(_refusals(log)[seen:]) and time.monotonic() < deadline:
                time.sleep(0.2)
            screenshot(driver, f"ui_guard_attack_page_{host}.png")
            refusals[host] = _refusals(log)[seen:]
    finally:
        server.shutdown()
    assert len(_runs(instance)) == before, "a page from another origin launched a run"
    # the requests reached the UI and the guard refused them (not only the browser's rules)
    same_site = refusals["127.0.0.1"]
    assert _same_site_refused(same_site), same_site
    cross_site = refusals["localhost"]
    assert _cross_site_refused(cross_site), cross_site


def _refusals(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if "refused" in line]


def _same_site_refused(lines: list[str]) -> bool:
    """The same-site page (cookie sent): GraphQL over GET and the cross-origin POSTs refused, 8 requests or more."""
    return (any("refused GET /graphql" in line and "GraphQL over GET" in line for line in lines)
            and any("refused POST /graphql" in line and "cross-origin" in line for line in lines)
            and len(lines) >= 8)


def _cross_site_refused(lines: list[str]) -> bool:
    """The cross-site page (no cookie): refused for the missing token, 8 requests or more."""
    return any("access token required" in line for line in lines) and len(lines) >= 8


@pytest.fixture(scope="module")
def inspector_url(tmp_path_factory: pytest.TempPathFactory):
    """The inspector on toy data as ``make inspect`` starts it (launcher, access token on)."""
    pytest.importorskip("streamlit", reason="BROWSER TESTS SKIPPED: pip install streamlit")
    from tests.browser_support import guarded_inspector

    with guarded_inspector(["-m", "dagster_project.launcher", "inspector", "--host", "127.0.0.1"],
                           tmp_path_factory.mktemp("inspector"), TOKEN, dict(os.environ)) as (url, _process):
        yield url


def test_guarded_inspector_renders_with_the_token(driver, inspector_url) -> None:
    wait = WebDriverWait(driver, 180, poll_frequency=0.5)  # generous: the UI loads slowly on a busy 2-core machine
    driver.get(inspector_url)
    assert "access token required" in driver.page_source
    driver.get(f"{inspector_url}/?token={TOKEN}")
    wait.until(lambda d: "token=" not in d.current_url)
    charts = '[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg.marks'
    drawn, page = settled(wait, lambda d: (visible(d, charts), d.page_source),
                          lambda found: len(found[0]) >= 2 and "channel 00000" in found[1], "two charts, channel 0")
    assert len(drawn) >= 2 and "channel 00000" in page, drawn
    screenshot(driver, "ui_guard_inspector.png")
