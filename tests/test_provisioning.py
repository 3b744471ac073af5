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
    provision,
    read_manifest,
)
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
    monkeypatch.setattr(provisioning, "RETRY_BACKOFF_S", 0.0)


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
    }
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
