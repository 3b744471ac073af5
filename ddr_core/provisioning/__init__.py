"""Provision model, SAE and dataset folders from the Hugging Face hub, Google Drive or a local path.

Guarantees, whatever the source:

* Every file is written to ``<name>.part`` and renamed into place only once it is complete and
  verified (size, and the hub's sha256 / git blob hash where the source publishes one).
* ``<dest>/.ddr_manifest.json`` (relative path -> size, sha256 and the file's mtime in ns, a
  description of the source and a ``content_hash`` = sha256 over the sorted ``(path, sha256)`` pairs)
  is written last and atomically, so its presence means the copy was complete. Manifests of version 1
  (no ``mtime_ns``) are still read; re-provisioning an intact copy adds the times.
* Whoever loads a provisioned folder checks it with :func:`verify_provisioned`: every file of the
  manifest present with its size and mtime (sha256 only when the time differs), no file the manifest
  does not list; a mismatch is an error naming the files and the command that re-provisions.
* A ``local`` source is copied without following links out of it or in loops, and only regular files
  (a FIFO or device would block or never end); a download never reads more bytes than the source lists
  (or announces, or :data:`DEFAULT_MAX_FILE_BYTES` when neither says), and a size mismatch is not retried.
* An intact copy (manifest for the same source, every file present with its size and, when
  ``verify``, its sha256) is skipped without touching the network.
* A partial or damaged copy (missing files, a leftover ``.part``, a wrong size, a file changed on
  disk since it was provisioned) re-fetches only what is missing or wrong, and reports it.

The hub is reached through :mod:`huggingface_hub` (its HTTP session, headers and URLs; see
:mod:`ddr_core.provisioning.hub`). A Hugging Face token is read from ``HF_TOKEN`` only and sent only to the
configured endpoint's origin (scheme, host and port of ``HubSource.endpoint`` / ``HF_ENDPOINT``): a redirect
to another origin (the LFS CDN, a hostile server) goes there without it, and a tree-API paging ``Link`` to
another origin is refused. It is never written to logs, errors or results. Google Drive is reached with
:mod:`urllib.request` (:mod:`ddr_core.provisioning.gdrive`) and never gets the token.

Modules: ``sources`` (sources, results, errors), ``manifest`` (the manifest and :func:`verify_provisioned`),
``download`` (origins, the size bound, streaming into ``.part``), ``hub``, ``gdrive``, ``local`` (one per
kind of source) and ``engine`` (:func:`provision`, :func:`check_intact`).
"""

from ddr_core.provisioning.download import url_origin
from ddr_core.provisioning.engine import check_intact, provision
from ddr_core.provisioning.hub import hub_endpoint
from ddr_core.provisioning.manifest import (
    content_hash_of,
    provisioned_content_hash,
    read_manifest,
    reprovision_hint,
    verify_provisioned,
)
from ddr_core.provisioning.sources import (
    DEFAULT_MAX_FILE_BYTES,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MAX_DOWNLOAD_BYTES_ENV,
    PART_SUFFIX,
    RESERVED_PREFIX,
    DownloadError,
    GoogleDriveSource,
    HubSource,
    LocalSource,
    ProgressFn,
    ProvisionedFolderChangedError,
    ProvisionError,
    ProvisionResult,
    Source,
    SourceNotFoundError,
    UnsafeSourceError,
)

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "MAX_DOWNLOAD_BYTES_ENV",
    "PART_SUFFIX",
    "RESERVED_PREFIX",
    "DownloadError",
    "GoogleDriveSource",
    "HubSource",
    "LocalSource",
    "ProgressFn",
    "ProvisionError",
    "ProvisionResult",
    "ProvisionedFolderChangedError",
    "Source",
    "SourceNotFoundError",
    "UnsafeSourceError",
    "check_intact",
    "content_hash_of",
    "hub_endpoint",
    "provision",
    "provisioned_content_hash",
    "read_manifest",
    "reprovision_hint",
    "verify_provisioned",
    "url_origin",
]
