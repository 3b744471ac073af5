"""The hub path goes through huggingface_hub (its HTTP session, headers and URLs), against the loopback fake hub,
and keeps ddr's rules: the token from ``HF_TOKEN`` only and only to the endpoint's origin, nothing written to
huggingface_hub's cache, signed CDN URLs in no log line, a repo id that could change the URL refused.

Only public names of :mod:`ddr_core.provisioning` are imported, so the file also runs against the code before
the hub went through huggingface_hub (where these tests fail).
"""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants

from ddr_core.config import HubSourceConfig
from ddr_core.provisioning import DownloadError, HubSource, provision
from tests.fake_remote import FakeRemote

REPO = "acme/tiny-sd"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
FILES = {"model_index.json": b'{"_class_name": "StableDiffusionPipeline"}\n', WEIGHTS: bytes(range(256)) * 8}
SECRET = "hf_SeCrEt_token_456"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HF_TOKEN", "HF_ENDPOINT", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub's caches and stored login, redirected to folders the tests can inspect
    hf_home = tmp_path / "hf_home"
    monkeypatch.setattr(hf_constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))


@pytest.fixture
def remote():
    server = FakeRemote()
    server.add_hub_repo(REPO, FILES)
    yield server
    server.close()


def test_hub_requests_go_through_huggingface_hub_and_the_token_stays_on_the_endpoint(
    remote: FakeRemote, tmp_path: Path, monkeypatch
) -> None:
    """Every request the fake hub sees (tree listing, resolve, CDN) carries huggingface_hub's user agent naming
    ddr and the request id its session adds; the token goes to the endpoint only (not to the CDN on another
    host name); huggingface_hub's cache stays untouched; HF_HUB_OFFLINE (its switch) stops provisioning with a
    clear error before any request."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    remote.required_token = SECRET
    result = provision(HubSource(REPO, endpoint=remote.url), tmp_path / "m")
    assert sorted(result.fetched) == sorted(FILES)
    paths = [path for path, _ in remote.requests]
    assert paths[0] == f"/api/models/{REPO}/tree/main?recursive=true"
    assert f"/{REPO}/resolve/main/{WEIGHTS}" in paths and any(p.startswith("/cdn/") for p in paths)
    version = f"hf_hub/{huggingface_hub.__version__}"
    for path, headers in remote.requests:
        agent = headers.get("User-Agent", "")
        assert agent.startswith("ddr/") and version in agent, (path, agent)
        assert headers.get("X-Amzn-Trace-Id"), path  # added by huggingface_hub's session hook
        on_endpoint = not path.startswith("/cdn/")  # the CDN is http://localhost:<port>, another host name
        assert (headers.get("Authorization") == f"Bearer {SECRET}") == on_endpoint, path
    assert not (tmp_path / "hf_home").exists()  # no huggingface_hub cache, no stored token read or written

    remote.requests.clear()
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set"):
        provision(HubSource(REPO, endpoint=remote.url), tmp_path / "offline")
    assert remote.requests == []


def test_a_stored_hub_login_is_never_sent(remote: FakeRemote, tmp_path: Path) -> None:
    """Only HF_TOKEN is a token for ddr: a login stored by ``hf auth login`` (which huggingface_hub sends
    implicitly) is not, so provisioning cannot send a token the configuration does not show."""
    (tmp_path / "hf_home").mkdir()
    (tmp_path / "hf_home" / "token").write_text(SECRET)
    assert huggingface_hub.get_token() == SECRET  # huggingface_hub itself would use it
    remote.required_token = SECRET
    with pytest.raises(DownloadError, match="HTTP 401.*set HF_TOKEN"):
        provision(HubSource(REPO, endpoint=remote.url), tmp_path / "m")
    assert remote.requests and all("Authorization" not in headers for _, headers in remote.requests)


def test_signed_cdn_urls_stay_out_of_the_http_libraries_logs(remote: FakeRemote, tmp_path: Path, caplog) -> None:
    """httpx2 logs every request URL at INFO and httpcore2 each redirect's Location at DEBUG: the signed CDN
    URL's query (its credentials) is removed from those lines."""
    for name in ("httpx2", "httpcore2"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG):
            provision(HubSource(REPO, endpoint=remote.url), tmp_path / "m")
    finally:
        for name in ("httpx2", "httpcore2"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    assert any(p.startswith("/cdn/") and "X-Signature=abc" in p for p, _ in remote.requests)
    assert "/cdn/" in caplog.text  # the CDN request was logged ...
    assert "X-Signature" not in caplog.text  # ... without its signature


@pytest.mark.parametrize("repo_id", ["acme/x?y=1", "acme/x#frag", "acme/a/b", "acme/x y", "acme/..", "/acme"])
def test_a_repo_id_that_would_change_the_url_is_refused(repo_id: str) -> None:
    """The repo id becomes part of every hub URL; one with a query, fragment, extra path segment or space is
    refused where it enters (the config, and HubSource), with the expected shape named."""
    with pytest.raises(ValueError, match="expected 'owner/name'"):
        HubSource(repo_id)
    with pytest.raises(ValueError, match="expected 'owner/name'"):
        HubSourceConfig(repo_id=repo_id)
