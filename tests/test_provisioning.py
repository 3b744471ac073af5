"""Tests for ddr_core.provisioning against loopback fakes of the HF hub and Google Drive."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ddr_core import provisioning
from ddr_core.provisioning import (
    MANIFEST_NAME,
    DownloadError,
    GoogleDriveSource,
    HubSource,
    LocalSource,
    SourceNotFoundError,
    content_hash_of,
    engine,
    provision,
    read_manifest,
)
from ddr_core.provisioning import hub as hub_module
from tests.fake_remote import DriveFile, FakeRemote

REPO = "acme/tiny-sd"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
REPO_FILES = {
    "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}\n',
    "unet/config.json": b'{"sample_size": 8}\n',
    WEIGHTS: bytes(range(256)) * 40,
    "text_encoder/model.safetensors": b"\x01\x02\x03" * 1000,
    "README.md": b"# tiny\n",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HF_TOKEN",
        "HF_ENDPOINT",
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(engine, "RETRY_BACKOFF_S", 0.0)


@pytest.fixture
def remote():
    server = FakeRemote()
    server.add_hub_repo(REPO, REPO_FILES)
    yield server
    server.close()


def hub(remote: FakeRemote, **kwargs) -> HubSource:
    return HubSource(repo_id=REPO, endpoint=remote.url, **kwargs)


def tree_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


# ---- hub -----------------------------------------------------------------------------------------


def test_full_hub_download_writes_files_and_manifest(remote: FakeRemote, tmp_path: Path) -> None:
    messages: list[str] = []
    result = provision(hub(remote), tmp_path / "model", progress=messages.append)
    assert tree_files(tmp_path / "model") == REPO_FILES
    assert not result.skipped and sorted(result.fetched) == sorted(REPO_FILES) and result.refetched == []
    assert result.n_files == 5 and result.n_bytes == sum(map(len, REPO_FILES.values()))
    manifest = read_manifest(tmp_path / "model")
    assert manifest is not None
    assert manifest["files"][WEIGHTS] == {
        "size": len(REPO_FILES[WEIGHTS]),
        "sha256": hashlib.sha256(REPO_FILES[WEIGHTS]).hexdigest(),
        "mtime_ns": (tmp_path / "model" / WEIGHTS).stat().st_mtime_ns,
    }
    assert manifest["version"] == provisioning.MANIFEST_VERSION == 2
    expected_hash = hashlib.sha256(
        "".join(f"{p}\0{hashlib.sha256(REPO_FILES[p]).hexdigest()}\n" for p in sorted(REPO_FILES)).encode()
    ).hexdigest()
    assert (
        result.content_hash == expected_hash == manifest["content_hash"] == content_hash_of(manifest["files"])
    )
    assert manifest["source"]["repo_id"] == REPO
    assert not list((tmp_path / "model").rglob("*.part"))
    assert any("fetching" in m for m in messages)
    # LFS files went through the resolve -> CDN redirect.
    assert (
        remote.count(f"/resolve/main/{WEIGHTS}") == 1
        and remote.count(f"/cdn/model/{REPO}/main/{WEIGHTS}") == 1
    )


def test_allow_patterns_filter(remote: FakeRemote, tmp_path: Path) -> None:
    result = provision(hub(remote, allow_patterns=["unet/", "model_index.json"]), tmp_path / "m")
    assert sorted(tree_files(tmp_path / "m")) == ["model_index.json", "unet/config.json", WEIGHTS]
    assert result.n_files == 3
    with pytest.raises(DownloadError, match=r"no file matching allow_patterns=\['vae/\*'\].*README\.md"):
        provision(hub(remote, allow_patterns=["vae/*"]), tmp_path / "n")


def test_tree_pagination_and_dataset_repo(tmp_path: Path) -> None:
    server = FakeRemote(tree_page_size=2)
    try:
        server.add_hub_repo(
            "acme/prompts",
            {"data/a.jsonl": b'{"text": "a"}\n', "data/b.jsonl": b'{"text": "b"}\n', "x.txt": b"x"},
            repo_type="dataset",
        )
        result = provision(
            HubSource("acme/prompts", repo_type="dataset", endpoint=server.url), tmp_path / "d"
        )
        assert result.n_files == 3
        # 4 entries (1 dir + 3 files) in pages of 2, followed through the Link header.
        assert server.count("/api/datasets/acme/prompts/tree/main") == 2
        assert server.count("/datasets/acme/prompts/resolve/main/data/a.jsonl") == 1
    finally:
        server.close()


def test_intact_copy_is_skipped_without_requests(remote: FakeRemote, tmp_path: Path) -> None:
    first = provision(hub(remote), tmp_path / "m")
    n_requests = len(remote.requests)
    messages: list[str] = []
    second = provision(hub(remote), tmp_path / "m", progress=messages.append)
    assert second.skipped and second.fetched == [] and second.refetched == []
    assert len(remote.requests) == n_requests
    assert second.content_hash == first.content_hash and second.n_files == first.n_files
    assert any("skipping" in m for m in messages)


def test_truncated_download_is_retried(remote: FakeRemote, tmp_path: Path) -> None:
    remote.truncate[WEIGHTS] = 1
    messages: list[str] = []
    result = provision(hub(remote), tmp_path / "m", progress=messages.append)
    assert tree_files(tmp_path / "m")[WEIGHTS] == REPO_FILES[WEIGHTS]
    assert remote.count(f"/cdn/model/{REPO}/main/{WEIGHTS}") == 2
    assert any(
        "attempt 1/3 failed" in m and f"received {len(REPO_FILES[WEIGHTS]) // 2} of" in m for m in messages
    )
    assert result.fetched.count(WEIGHTS) == 1


def test_persistently_truncated_file_errors_then_rerun_fetches_only_it(
    remote: FakeRemote, tmp_path: Path
) -> None:
    remote.truncate[WEIGHTS] = -1
    size = len(REPO_FILES[WEIGHTS])
    with pytest.raises(
        DownloadError, match=rf"{WEIGHTS}: received {size // 2} of {size} bytes.*after 3 attempt"
    ):
        provision(hub(remote), tmp_path / "m")
    dest = tmp_path / "m"
    assert not (dest / MANIFEST_NAME).exists()
    assert not (dest / WEIGHTS).exists() and not (dest / (WEIGHTS + ".part")).exists()
    assert (dest / "README.md").read_bytes() == REPO_FILES["README.md"]

    remote.truncate.clear()
    remote.requests.clear()
    result = provision(hub(remote), dest)
    assert result.fetched == [WEIGHTS] and not result.skipped
    assert tree_files(dest) == REPO_FILES
    assert remote.count("/resolve/") == 1  # only the bad file, plus one listing
    assert remote.count("/tree/") == 1


def test_corrupt_download_fails_sha256_check(remote: FakeRemote, tmp_path: Path) -> None:
    remote.corrupt.add(WEIGHTS)
    with pytest.raises(DownloadError, match=r"sha256 .* differs from the source's"):
        provision(hub(remote), tmp_path / "m", attempts=2)
    remote.corrupt = {"unet/config.json"}  # non-LFS file: verified with the git blob hash
    with pytest.raises(DownloadError, match=r"unet/config\.json: git blob hash"):
        provision(hub(remote), tmp_path / "m2", attempts=1)


def test_changed_on_disk_file_is_detected_and_refetched(remote: FakeRemote, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    provision(hub(remote), dest)
    damaged = bytearray((dest / WEIGHTS).read_bytes())
    damaged[100] ^= 0xFF  # same size, different content
    (dest / WEIGHTS).write_bytes(bytes(damaged))
    (dest / "unet/config.json").write_bytes(b'{"sample_size": 9}\n')  # non-LFS, same size
    remote.requests.clear()
    messages: list[str] = []
    result = provision(hub(remote), dest, progress=messages.append)
    assert not result.skipped
    assert sorted(result.refetched) == sorted([WEIGHTS, "unet/config.json"]) == sorted(result.fetched)
    assert tree_files(dest) == REPO_FILES
    assert any(m.startswith(WEIGHTS) and "changed on disk" in m for m in messages)
    assert remote.count("/resolve/") == 2


def test_verify_false_checks_sizes_only(remote: FakeRemote, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    provision(hub(remote), dest)
    (dest / "README.md").write_bytes(b"# TINY\n")
    assert provision(hub(remote), dest, verify=False).skipped
    assert not provision(hub(remote), dest, verify=True).skipped
    assert (dest / "README.md").read_bytes() == REPO_FILES["README.md"]


def test_partial_copy_refetches_missing_and_leftover_part(remote: FakeRemote, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    provision(hub(remote), dest)
    (dest / "README.md").unlink()
    (dest / "text_encoder/model.safetensors").rename(dest / "text_encoder/model.safetensors.part")
    (dest / MANIFEST_NAME).unlink()  # as after an interrupted first run
    result = provision(hub(remote), dest)
    assert sorted(result.fetched) == ["README.md", "text_encoder/model.safetensors"]
    assert result.refetched == ["text_encoder/model.safetensors"]
    assert tree_files(dest) == REPO_FILES


def test_wrong_size_file_is_refetched(remote: FakeRemote, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    provision(hub(remote), dest)
    (dest / WEIGHTS).write_bytes(REPO_FILES[WEIGHTS][:10])
    result = provision(hub(remote), dest)
    assert result.refetched == [WEIGHTS]


def test_token_sent_to_hub_only_and_never_reported(
    remote: FakeRemote, tmp_path: Path, monkeypatch, caplog
) -> None:
    secret = "hf_SeCrEt_token_123"
    remote.required_token = secret
    with pytest.raises(DownloadError, match="HTTP 401.*set HF_TOKEN") as error:
        provision(hub(remote), tmp_path / "denied")
    assert secret not in str(error.value)

    remote.requests.clear()
    monkeypatch.setenv("HF_TOKEN", secret)
    messages: list[str] = []
    with caplog.at_level("DEBUG"):
        result = provision(hub(remote), tmp_path / "m", progress=messages.append)
        provision(hub(remote), tmp_path / "m2")  # default progress goes to the logger
    hub_requests = [headers for path, headers in remote.requests if "/resolve/" in path or "/tree/" in path]
    cdn_requests = [headers for path, headers in remote.requests if path.startswith("/cdn/")]
    assert hub_requests and all(h.get("Authorization") == f"Bearer {secret}" for h in hub_requests)
    assert cdn_requests and all("Authorization" not in h for h in cdn_requests)
    visible = "\n".join(messages) + repr(result) + caplog.text + (tmp_path / "m" / MANIFEST_NAME).read_text()
    assert secret not in visible
    assert "X-Signature" not in visible  # signed CDN query strings are not logged either


SECRET = "hf_SeCrEt_token_123"


@pytest.fixture
def other():
    """A second loopback server holding the same repo: another port, so another origin than ``remote``."""
    server = FakeRemote()
    server.add_hub_repo(REPO, REPO_FILES)
    yield server
    server.close()


def _with_token(server: FakeRemote) -> list[str]:
    """Paths of the requests that reached ``server`` with an Authorization header."""
    return [path for path, headers in server.requests if "Authorization" in headers]


@pytest.mark.parametrize("elsewhere", ["another port", "another host name", "another scheme"])
def test_paging_link_to_another_origin_is_refused_and_gets_no_token(
    remote: FakeRemote, other: FakeRemote, tmp_path: Path, monkeypatch, elsewhere: str
) -> None:
    """A hostile hub's tree-API ``Link: <...>; rel="next"`` naming another origin is not followed: the
    listing fails with a clear error and that origin is never contacted (it would have received the
    HF_TOKEN). ``other`` could serve the rest of the listing, so following it would "work" silently."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    remote.required_token = SECRET
    remote.tree_page_size = other.tree_page_size = 2
    remote.next_link_base = {
        "another port": other.url,
        "another host name": f"http://localhost:{remote.port}",
        "another scheme": f"https://127.0.0.1:{remote.port}",
    }[elsewhere]
    with pytest.raises(DownloadError, match=r"paging Link header points to .*another origin.*refusing") as error:
        provision(hub(remote), tmp_path / "m")
    assert SECRET not in str(error.value)
    assert other.requests == []
    assert [h for _, h in remote.requests if h.get("Host", "").startswith("localhost")] == []
    # the endpoint itself was asked (with the token) for the first page only
    assert [path for path, _ in remote.requests] == [f"/api/models/{REPO}/tree/main?recursive=true"]
    assert _with_token(remote) == [path for path, _ in remote.requests]
    assert not (tmp_path / "m" / MANIFEST_NAME).exists()


def test_paging_on_the_endpoint_keeps_the_token(remote: FakeRemote, tmp_path: Path, monkeypatch) -> None:
    """Same-origin paging (an absolute Link with the default port spelled out differently is the same
    origin too) is followed, with the token, on every page."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    remote.required_token = SECRET
    remote.tree_page_size = 2
    remote.next_link_base = f"http://LOCALHOST:{remote.port}"
    provision(HubSource(REPO, endpoint=f"http://localhost:{remote.port}/"), tmp_path / "m")
    assert tree_files(tmp_path / "m") == REPO_FILES
    assert remote.count("/tree/main") == 4  # 7 entries (2 directories + 5 files) in pages of 2
    tree_requests = [h for path, h in remote.requests if "/tree/" in path]
    assert all(h.get("Authorization") == f"Bearer {SECRET}" for h in tree_requests)


def test_redirects_to_another_origin_drop_the_token(
    remote: FakeRemote, other: FakeRemote, tmp_path: Path, monkeypatch
) -> None:
    """The tree API and a plain file redirected to another port are fetched there WITHOUT the token; a
    same-origin redirect keeps it; a hop through another origin does not bring it back."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    tree = f"/api/models/{REPO}/tree/main?recursive=true"
    index, readme = f"/{REPO}/resolve/main/model_index.json", f"/{REPO}/resolve/main/README.md"
    remote.redirects[tree] = other.url + tree
    remote.redirects[index] = other.url + index
    remote.redirects[readme] = f"{remote.url}{readme}?moved=1"  # same origin: keeps the token
    remote.required_token = SECRET  # every hub request on the endpoint needs it
    provision(hub(remote), tmp_path / "m")
    assert tree_files(tmp_path / "m") == REPO_FILES
    assert sorted(path for path, _ in other.requests) == sorted([tree, index])  # it was contacted ...
    assert _with_token(other) == []  # ... without the token
    assert remote.count(f"{readme}?moved=1") == 1
    hub_paths = [path for path, _ in remote.requests if not path.startswith("/cdn/")]
    assert sorted(_with_token(remote)) == sorted(hub_paths)

    # endpoint -> other origin -> back to the endpoint: the token stays dropped (so the endpoint says 401)
    other.redirects[index] = f"{remote.url}{index}?back=1"
    with pytest.raises(DownloadError, match="HTTP 401") as error:
        provision(hub(remote, allow_patterns=["model_index.json"]), tmp_path / "n")
    assert SECRET not in str(error.value)
    assert _with_token(other) == []
    assert [h for path, h in remote.requests if path.endswith("?back=1")] and f"{index}?back=1" not in _with_token(remote)


def test_lfs_redirect_to_another_port_gets_no_token(
    remote: FakeRemote, other: FakeRemote, tmp_path: Path, monkeypatch
) -> None:
    """LFS files redirect to a CDN; a CDN on another port of the same host is another origin."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    remote.required_token = SECRET
    remote.cdn_base = other.url
    provision(hub(remote), tmp_path / "m")
    assert tree_files(tmp_path / "m") == REPO_FILES
    lfs = sorted(p for p in REPO_FILES if remote.is_lfs(p))
    assert sorted(path.split("/main/", 1)[1].split("?")[0] for path, _ in other.requests) == lfs
    assert _with_token(other) == []
    assert remote.count("/resolve/main/") == len(REPO_FILES) and len(_with_token(remote)) == len(remote.requests)


def test_drive_requests_never_carry_the_hub_token(remote: FakeRemote, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_ENDPOINT", remote.url)  # even when Drive is served from the hub's own origin
    remote.drive_files["f-big"] = DriveFile("w.safetensors", b"w" * 5000, confirm=True)
    remote.drive_folders["root"] = [("file", "f-big", "w.safetensors")]
    provision(drive(remote, folder_id="root"), tmp_path / "d")
    assert remote.requests and _with_token(remote) == []


def test_url_origin_and_invalid_endpoints(tmp_path: Path, monkeypatch) -> None:
    assert provisioning.url_origin("HTTPS://HuggingFace.co:443/api") == provisioning.url_origin("https://huggingface.co")
    assert provisioning.url_origin("http://127.0.0.1:1/") != provisioning.url_origin("http://127.0.0.1:2/")
    assert provisioning.url_origin("http://127.0.0.1:1@evil.example/")[1] == "evil.example"
    assert provisioning.url_origin("http://h:notaport/")[2] == -1
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_ENDPOINT", "ftp://mirror.example")
    with pytest.raises(provisioning.ProvisionError, match="invalid hub endpoint 'ftp://mirror.example'.*HF_ENDPOINT"):
        provision(HubSource(REPO), tmp_path / "a")
    with pytest.raises(provisioning.ProvisionError, match="invalid hub endpoint") as error:
        provision(HubSource(REPO, endpoint="https://user:pw-secret@mirror.example"), tmp_path / "b")
    assert "pw-secret" not in str(error.value)


def test_missing_repo_names_the_fix(remote: FakeRemote, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404.*check the repo id"):
        provision(HubSource("acme/absent", endpoint=remote.url), tmp_path / "m")


# ---- Google Drive --------------------------------------------------------------------------------


def drive(remote: FakeRemote, **kwargs) -> GoogleDriveSource:
    return GoogleDriveSource(
        base_url=remote.url, folder_list_url=f"{remote.url}/embeddedfolderview", **kwargs
    )


def test_drive_folder_with_subfolder_and_confirmation_page(remote: FakeRemote, tmp_path: Path) -> None:
    big = bytes(range(256)) * 64
    remote.drive_files["f-index"] = DriveFile("model_index.json", b'{"a": 1}')
    remote.drive_files["f-big"] = DriveFile("diffusion_pytorch_model.safetensors", big, confirm=True)
    remote.drive_folders["root"] = [("file", "f-index", "model_index.json"), ("folder", "d-unet", "unet")]
    remote.drive_folders["d-unet"] = [("file", "f-big", "diffusion_pytorch_model.safetensors")]
    result = provision(drive(remote, folder_id="root"), tmp_path / "style50")
    assert tree_files(tmp_path / "style50") == {
        "model_index.json": b'{"a": 1}',
        "unet/diffusion_pytorch_model.safetensors": big,
    }
    assert result.n_files == 2
    assert remote.count("/download?id=f-big") == 2  # confirmation page, then the file
    assert remote.count("uuid=uuid-f-big") == 1

    n_requests = len(remote.requests)
    assert provision(drive(remote, folder_id="root"), tmp_path / "style50").skipped
    assert len(remote.requests) == n_requests


def test_drive_single_file_names_and_truncation(remote: FakeRemote, tmp_path: Path) -> None:
    remote.drive_files["f-meta"] = DriveFile("UnlearnCanvas Metadata.jsonl", b'{"text": "a cat"}\n')
    named = provision(drive(remote, file_id="f-meta", filename="metadata.jsonl"), tmp_path / "a")
    assert tree_files(tmp_path / "a") == {"metadata.jsonl": b'{"text": "a cat"}\n'} and named.n_files == 1
    # Without a filename the name comes from Content-Disposition; a truncated body is retried.
    remote.truncate["f-meta"] = 1
    server_named = provision(drive(remote, file_id="f-meta"), tmp_path / "b")
    assert server_named.fetched == ["UnlearnCanvas Metadata.jsonl"]
    n_requests = len(remote.requests)
    assert provision(drive(remote, file_id="f-meta"), tmp_path / "b").skipped
    assert len(remote.requests) == n_requests


def test_drive_unshared_file_reports_html_page(remote: FakeRemote, tmp_path: Path) -> None:
    remote.drive_files["f-private"] = DriveFile("x.bin", b"x", shared=False)
    with pytest.raises(
        DownloadError, match="HTML page \\('Google Drive - Access Denied'\\).*anyone with the link"
    ):
        provision(drive(remote, file_id="f-private"), tmp_path / "x")


def test_drive_source_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        GoogleDriveSource()
    with pytest.raises(ValueError, match="exactly one"):
        GoogleDriveSource(file_id="a", folder_id="b")


# ---- local ---------------------------------------------------------------------------------------


def test_local_tree_copy_skip_and_update(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "unet").mkdir(parents=True)
    (source / "unet" / "w.safetensors").write_bytes(b"\x00" * 100)
    (source / "model_index.json").write_text("{}")
    dest = tmp_path / "dest"
    first = provision(LocalSource(source), dest)
    assert tree_files(dest) == tree_files(source) and sorted(first.fetched) == [
        "model_index.json",
        "unet/w.safetensors",
    ]
    assert provision(LocalSource(source), dest).skipped

    (source / "model_index.json").write_text("{ }")
    changed = provision(LocalSource(source), dest)
    assert changed.fetched == ["model_index.json"] == changed.refetched
    assert (dest / "model_index.json").read_text() == "{ }"
    assert changed.content_hash != first.content_hash


def test_local_single_file(tmp_path: Path) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"text": "x"}\n')
    result = provision(LocalSource(source), tmp_path / "dest")
    assert tree_files(tmp_path / "dest") == {"prompts.jsonl": b'{"text": "x"}\n'}
    assert result.path == tmp_path / "dest"
    manifest = json.loads((tmp_path / "dest" / MANIFEST_NAME).read_text())
    assert list(manifest["files"]) == ["prompts.jsonl"]


def test_missing_local_path_is_a_hard_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(SourceNotFoundError, match=rf"local source {missing} does not exist"):
        provision(LocalSource(missing), tmp_path / "dest")
    assert isinstance(SourceNotFoundError("x"), FileNotFoundError)


def test_one_provisioning_at_a_time_per_destination(tmp_path: Path) -> None:
    """A run finding the destination's lock held fails at once (or after waiting) naming the holder; two
    runs at once never both copy: one fetches, the other waits and skips the intact copy."""
    from concurrent.futures import ThreadPoolExecutor

    from ddr_core.locks import PartitionLockedError
    from tests.test_failure_modes import hold_lock, stop

    source = tmp_path / "src"
    (source / "unet").mkdir(parents=True)
    for index in range(20):
        (source / "unet" / f"w{index}.safetensors").write_bytes(bytes([index]) * 200_000)
    dest = tmp_path / "models" / "toy"
    holder = hold_lock(tmp_path / "models" / ".toy.lock", owner="provisioning run A")
    try:
        with pytest.raises(PartitionLockedError, match="provisioning run A"):
            provision(LocalSource(source), dest, lock_wait=False)
        with pytest.raises(PartitionLockedError, match="provisioning run A"):
            provision(LocalSource(source), dest, lock_wait=0.3)
        assert not any(dest.rglob("*.safetensors"))  # nothing copied while the lock was held
    finally:
        stop(holder)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: provision(LocalSource(source), dest), range(2)))
    assert sorted(result.skipped for result in results) == [False, True]
    assert sorted(len(result.fetched) for result in results) == [0, 20]
    assert tree_files(dest) == tree_files(source)


# ---- a local source is copied without following links out of it or in loops, regular files only --------


def _with_deadline(function, seconds: float = 20.0):
    """``function()``'s result or exception, failing the test (not hanging it) when it runs past ``seconds``."""
    import threading

    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (a loop of links, or a blocking read)"
    return outcome


def _model_source(root: Path) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "w.safetensors").write_bytes(b"\x01" * 1000)
    (root / "model_index.json").write_text("{}")
    return root


@pytest.mark.parametrize("links, named", [
    ({"a/to_b": "../b", "b/to_a": "../a"}, "b/to_a"),  # a loop through two folders
    ({"unet/l1": "..", "unet/l2": ".."}, "unet/l1"),  # two links up: 2**depth paths to walk
])
def test_local_source_with_a_loop_of_links_is_refused_naming_the_link(
    tmp_path: Path, links: dict[str, str], named: str
) -> None:
    """Links forming a loop made the copy follow them again and again (2.6 GB in 90 s on a real model; two
    links to one folder make the walk exponential); now reaching a folder a second time is an error naming
    the link, before anything is copied."""
    source = _model_source(tmp_path / "src")
    (source / "a").mkdir()
    (source / "b").mkdir()
    (source / "a" / "x.txt").write_text("x")
    for link, target in links.items():
        (source / link).symlink_to(target)
    outcome = _with_deadline(lambda: provision(LocalSource(source), tmp_path / "dest"))
    error = outcome.get("error")
    assert type(error).__name__ == "UnsafeSourceError", outcome
    assert f"{named} is a link to the folder" in str(error) and "already includes" in str(error)
    assert "remove the link" in str(error)
    assert not (tmp_path / "dest" / MANIFEST_NAME).exists()
    assert sum(1 for _ in (tmp_path / "dest").rglob("*")) < 10  # stopped before copying much


def test_local_source_link_to_outside_is_refused(tmp_path: Path) -> None:
    """A link to a file outside the source (a huge checkpoint elsewhere, /dev/zero) is refused by name; a
    link to a file inside the source is copied as a file."""
    source = _model_source(tmp_path / "src")
    (tmp_path / "elsewhere.bin").write_bytes(b"\x02" * 5000)
    (source / "unet" / "extra.safetensors").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(provisioning.ProvisionError,  # UnsafeSourceError
                       match=r"unet/extra\.safetensors is a link to .*elsewhere\.bin, outside the source"):
        provision(LocalSource(source), tmp_path / "dest")
    assert not (tmp_path / "dest" / "unet" / "extra.safetensors").exists()

    (source / "unet" / "extra.safetensors").unlink()
    (source / "unet" / "zero").symlink_to("/dev/zero")
    with pytest.raises(provisioning.ProvisionError, match=r"unet/zero is a link to /dev/zero, outside"):
        provision(LocalSource(source), tmp_path / "dest")

    (source / "unet" / "zero").unlink()
    (source / "alias.json").symlink_to("model_index.json")  # inside: followed, copied as a file
    result = provision(LocalSource(source), tmp_path / "dest")
    assert "alias.json" in result.fetched and not (tmp_path / "dest" / "alias.json").is_symlink()


def test_local_source_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO in the source used to be opened for reading, which blocks for ever (no writer)."""
    import os

    source = _model_source(tmp_path / "src")
    os.mkfifo(source / "unet" / "pipe.safetensors")
    outcome = _with_deadline(lambda: provision(LocalSource(source), tmp_path / "dest"))
    error = outcome.get("error")
    assert type(error).__name__ == "UnsafeSourceError", outcome
    assert "unet/pipe.safetensors is a FIFO" in str(error) and "regular files only" in str(error)
    outcome = _with_deadline(lambda: provision(LocalSource(source / "unet" / "pipe.safetensors"), tmp_path / "d2"))
    assert type(outcome.get("error")).__name__ == "UnsafeSourceError", outcome


# ---- a download never reads more than the source lists; a size violation is not retried ----------------


BIG = 20 << 20  # what a hostile server sends in place of a listed 10-byte file
SMALL = "small.txt"


@pytest.fixture
def liar():
    server = FakeRemote()
    server.add_hub_repo(REPO, {SMALL: b"0123456789", "model_index.json": b"{}"})
    yield server
    server.close()


@pytest.mark.parametrize("content_length", [True, False])
def test_body_longer_than_listed_stops_at_once_and_is_not_retried(
    liar: FakeRemote, tmp_path: Path, content_length: bool
) -> None:
    """The hub lists 10 bytes and sends 20 MB (announced or not): the download stops at the listed size
    (or before reading, on a Content-Length that says so), fails naming the file and both sizes, and is
    not tried again: it used to be read whole, three times."""
    liar.serve_instead[SMALL] = b"x" * BIG
    if not content_length:
        liar.no_content_length.add(SMALL)
    with pytest.raises(DownloadError, match=rf"{SMALL}: .*(20971520|more than 10 bytes).*lists 10|"
                                            rf"{SMALL}: the server (announces|sent) .*10") as error:
        provision(HubSource(REPO, endpoint=liar.url), tmp_path / "m")
    assert "not retried" in str(error.value)
    assert liar.count(f"/resolve/main/{SMALL}") == 1
    assert liar.body_bytes_sent.get(SMALL, 0) < 8 << 20  # what sat in socket buffers, not 3 x 20 MB
    assert not list((tmp_path / "m").rglob("*.part")) and not (tmp_path / "m" / SMALL).exists()
    assert (tmp_path / "m" / "model_index.json").read_bytes() == b"{}"  # the other file still arrived


def test_endless_drive_body_stops_at_the_limit(liar: FakeRemote, tmp_path: Path, monkeypatch) -> None:
    """A Drive file has no listed size; a server that never ends its body (no Content-Length) is cut at
    ``max_file_bytes`` / DDR_MAX_DOWNLOAD_BYTES; one that announces more than the limit is not read."""
    liar.drive_files["f-endless"] = DriveFile("w.bin", b"w" * 100)
    liar.endless.add("f-endless")
    with pytest.raises(DownloadError, match=r"w\.bin: the server sent more than 1048576 bytes.*at most 1048576"):
        provision(drive(liar, file_id="f-endless", filename="w.bin"), tmp_path / "d", max_file_bytes=1 << 20)
    assert liar.count("id=f-endless") == 1
    assert liar.body_bytes_sent["f-endless"] < 16 << 20  # not the 256 MB the fake would send

    liar.drive_files["f-big"] = DriveFile("big.bin", b"b" * (3 << 20))
    monkeypatch.setenv(provisioning.MAX_DOWNLOAD_BYTES_ENV, str(1 << 20))
    with pytest.raises(DownloadError, match=rf"big\.bin: the server announces {3 << 20} bytes, more than the "
                                            rf"{1 << 20} allowed.*{provisioning.MAX_DOWNLOAD_BYTES_ENV}"):
        provision(drive(liar, file_id="f-big", filename="big.bin"), tmp_path / "e")
    monkeypatch.setenv(provisioning.MAX_DOWNLOAD_BYTES_ENV, "lots")
    with pytest.raises(provisioning.ProvisionError, match="DDR_MAX_DOWNLOAD_BYTES is 'lots'"):
        provision(drive(liar, file_id="f-big", filename="big.bin"), tmp_path / "e")
    monkeypatch.delenv(provisioning.MAX_DOWNLOAD_BYTES_ENV)
    assert provision(drive(liar, file_id="f-big", filename="big.bin"), tmp_path / "e").n_bytes == 3 << 20


def test_hub_listing_of_wrong_types_or_endless_length_is_refused(liar: FakeRemote, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Tree API entries whose size / hash are not what the hub sends, and a listing page longer than
    MAX_LISTING_BYTES, are clear errors (they were a ValueError / TypeError, or read whole)."""
    liar.tree_overrides[SMALL] = {"size": "ten"}
    with pytest.raises(DownloadError, match=rf"{SMALL}: size 'ten' is not a byte count"):
        provision(HubSource(REPO, endpoint=liar.url), tmp_path / "a")
    liar.tree_overrides[SMALL] = {"size": [10]}
    with pytest.raises(DownloadError, match=rf"{SMALL}: size \[10\] is not a byte count"):
        provision(HubSource(REPO, endpoint=liar.url), tmp_path / "a")
    liar.tree_overrides[SMALL] = {"oid": {"sha": 1}}
    with pytest.raises(DownloadError, match=rf"{SMALL}: oid .* is not a git hash"):
        provision(HubSource(REPO, endpoint=liar.url), tmp_path / "a")
    liar.tree_overrides.clear()
    monkeypatch.setattr(hub_module, "MAX_LISTING_BYTES", 4096)
    liar.tree_padding = 10_000
    with pytest.raises(DownloadError, match="longer than 4096 bytes"):
        provision(HubSource(REPO, endpoint=liar.url), tmp_path / "a")
