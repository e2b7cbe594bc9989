"""Downloads from the Hugging Face Hub: the only module that touches the network.

Files go into the standard Hub cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT are
honoured by huggingface_hub itself). huggingface_hub checks only a download's size, so the sha256
of every file is checked here before anything parses it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import DdimctlError
from ..io.files import sha256_of


def host_resolves(endpoint: str | None = None) -> bool:
    """Whether the Hub endpoint's host name resolves (a local lookup, no connection made)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(endpoint or constants.ENDPOINT).hostname
    if not host:
        return False
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return True


def _host(endpoint: str | None) -> str:
    from huggingface_hub import constants

    parsed = urlparse(endpoint or constants.ENDPOINT)
    return parsed.netloc or str(endpoint)


def reachability_problem(repo: str, filename: str, revision: str, endpoint: str | None) -> str | None:
    """One HEAD request for the file, bounded by HF_HUB_ETAG_TIMEOUT and never retried: what went
    wrong at the network level ("refused the connection", "did not answer in 10 s"), or None (an
    answer came, even a 404: huggingface_hub then reports it). Without this, huggingface_hub retries
    an unreachable Hub five times with backoff: half a minute or more before any message."""
    import inspect

    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
    once = {"retry_on_errors": False} if "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters else {}
    try:
        get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT, **once)
    except (HfHubHTTPError, EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None  # the Hub answered
    except Exception as e:  # the HTTP client's own errors, whatever the client library
        kind = type(e).__name__.lower()
        if "timeout" in kind:
            return f"did not answer within {constants.HF_HUB_ETAG_TIMEOUT} s (HF_HUB_ETAG_TIMEOUT)"
        if "connect" in kind:
            return "refused or dropped the connection"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"could not be asked ({first})"
    return None


def cached_file(repo: str, filename: str, revision: str = "main", cache_dir: str | None = None) -> Path | None:
    """The cached copy of a Hub file, or None; never touches the network."""
    found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None


def cached_repositories(cache_dir: str | None = None) -> list[tuple[str, list[str], list[Path]]]:
    """(repository id, its refs or commit ids, each snapshot folder) of every model repository in the
    Hub cache; never touches the network. A cache that does not exist (yet) holds none."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir)
    except (CacheNotFound, OSError, ValueError):
        return []
    return sorted(
        (repo.repo_id, sorted({ref for r in repo.revisions for ref in r.refs} or {r.commit_hash[:12] for r in repo.revisions}),
         [Path(r.snapshot_path) for r in repo.revisions])
        for repo in info.repos if repo.repo_type == "model"
    )


# What works with no network, as a command to paste.
OFFLINE = "the bundled model, which needs no network: ddimctl sample --model digits --steps 50 --eta 0"


def download(
    name: str,
    repo: str,
    filename: str,
    revision: str = "main",
    sha256: str | None = None,
    *,
    cache_dir: str | None = None,
    endpoint: str | None = None,
    missing_ok: bool = False,
    fix: str = "weights.toml",
) -> Path | None:
    """Fetch (or find in the cache) one file of a Hub repo and verify its sha256.

    Raises DdimctlError with a one-line message naming the model and what to do (`fix`: where the
    repo, revision and file were named); a file the repo lacks is None with missing_ok.
    """
    where = f"{repo}@{revision}/{filename}"
    # huggingface_hub retries a host that does not resolve for ~25 s: with no DNS answer there is
    # no network to wait for, so only the cache is asked.
    local_only = not host_resolves(endpoint)
    if not local_only and cached_file(repo, filename, revision, cache_dir) is None:
        problem = reachability_problem(repo, filename, revision, endpoint)
        if problem is not None:
            raise DdimctlError(
                f"model {name!r}: {where} is not in the Hub cache and the Hub at {_host(endpoint)} {problem}; check the "
                f"network or proxy (or point HF_ENDPOINT at a mirror), or use a local checkpoint or {OFFLINE}"
            )
    try:
        path = Path(
            hf_hub_download(
                repo, filename, revision=revision, cache_dir=cache_dir, endpoint=endpoint, local_files_only=local_only
            )
        )
    except LocalEntryNotFoundError as e:  # offline, or the endpoint unreachable, and not cached
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        reason = (
            "offline mode is on (HF_HUB_OFFLINE)" if offline
            else "the Hub's host name does not resolve (no network?)" if local_only
            else "the Hub could not be reached"
        )
        raise DdimctlError(
            f"model {name!r}: {where} is not in the Hub cache and {reason}; connect to the network "
            f"(or point HF_ENDPOINT at a mirror), or use a local checkpoint or {OFFLINE}"
        ) from e
    except RepositoryNotFoundError as e:
        raise DdimctlError(
            f"model {name!r}: repository {repo} was not found on the Hub; check {fix}"
        ) from e
    except RevisionNotFoundError as e:
        raise DdimctlError(
            f"model {name!r}: revision {revision!r} of {repo} does not exist; fix the revision in {fix}"
        ) from e
    except EntryNotFoundError as e:
        if missing_ok:
            return None
        raise DdimctlError(
            f"model {name!r}: {repo} has no file {filename!r} at {revision}; fix the file in {fix}"
        ) from e
    except Exception as e:  # the HTTP client's own errors too (a body cut short, a redirect loop, a stall)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DdimctlError(f"model {name!r}: download of {where} failed ({type(e).__name__}: {first_line}); "
                           f"try again later") from e

    if sha256:
        actual = sha256_of(path)
        if actual != sha256.lower():
            remove_download(path, cache_dir)
            raise DdimctlError(
                f"model {name!r}: {where} has sha256 {actual[:16]}..., expected {sha256[:16]}...; "
                f"the corrupt download was deleted, run the command again to fetch it afresh"
            )
    return path


def reported_sha256(path: Path) -> str | None:
    """The sha256 the Hub reported for a cached file stored in LFS: huggingface_hub names each blob
    by the ETag the Hub sent, which for LFS files is their sha256 (git-stored files get a 40-digit
    git hash instead: None)."""
    blob = Path(path).resolve().name
    return blob if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob) else None


def remove_download(snapshot_path: Path, cache_dir: str | None = None) -> None:
    """Delete a cached Hub file that failed a check: its snapshot entry and the blob the entry links
    to, but only what lies inside the Hub cache. A poisoned cache whose entry links to a user's
    file loses the link; the user's file is never touched."""
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE).resolve()
    entry = Path(snapshot_path)
    if not entry.parent.resolve().is_relative_to(root):  # not the cache's own entry: leave it
        return
    target = entry.resolve() if entry.is_symlink() else None
    entry.unlink(missing_ok=True)
    if target is not None and target.parent.name == "blobs" and target.is_relative_to(root) and not target.is_symlink():
        target.unlink(missing_ok=True)
