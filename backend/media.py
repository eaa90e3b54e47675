"""Fetching task images: Label Studio uploads, local-files storage, cloud storage (presigned
through Label Studio) and http(s) URLs, through the Label Studio SDK's media helper.

What is never done: reading `file://` URLs or local paths outside the operator's
RFCLIP_ALLOWED_LOCAL_DIR (resolved, so neither `..` nor symlinks escape it); connecting to
addresses the destination policy refuses (`netguard`); downloading more than the byte limit,
or for longer than the timeout, connect to last byte; decoding more than the pixel limit;
serving one project's cached download for another's URL or credentials.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path, http_session

from rfclip_engine.files import prune_cache
from rfclip_engine.imageio import ImageError, read_rgb

from .netguard import DestinationPolicy, DownloadRefused, GuardedSession
from .redaction import bounded

log = logging.getLogger("rfclip.backend.media")
_LS_PATH_PREFIXES = ("/data/upload", "upload/", "/upload/", "/storage-data/", "data/upload")
_CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")
# The SDK reads uploads straight from a local Label Studio data folder when one exists; the
# backend must read only what the operator allowed, so it points the SDK at a folder that never exists.
_NO_LOCAL_UPLOADS = "/nonexistent/rfclip-no-local-uploads"


_NO_LABEL_STUDIO = ("this image is served by Label Studio, but the backend knows no Label Studio URL and "
                    "token: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")


class MediaError(Exception):
    """A task's image cannot be used; the message says why (and holds no credentials)."""


class Picture(NamedTuple):
    """A task's image: its RGB pixels (a large JPEG decoded reduced) and its full (H, W)."""

    rgb: np.ndarray
    size: Tuple[int, int]


@dataclass(frozen=True)
class Credentials:
    """Where Label Studio is and how to authenticate to it (legacy token or personal access token)."""

    url: Optional[str]
    token: Optional[str]

    def __repr__(self) -> str:
        return f"Credentials(url={self.url!r}, token={'***' if self.token else None})"

    @property
    def identity(self) -> str:
        """A digest naming these credentials, for cache keys (the token itself is never stored)."""
        return hashlib.sha256(f"{self.url}\0{self.token}".encode()).hexdigest()


@lru_cache(maxsize=16)
def _ls_client(url: str, token: str):
    from label_studio_sdk.client import LabelStudio

    return LabelStudio(base_url=url, api_key=token)


def access_token(credentials: Credentials) -> str:
    """The token media requests carry: a legacy token as it is; a personal access token (a
    refresh JWT) exchanged by the SDK for a short-lived access token, renewed when it expires."""
    if not credentials.token or not credentials.url:
        return credentials.token or ""
    try:
        # The SDK's client wrapper owns the exchange and its expiry cache.
        header = _ls_client(credentials.url, credentials.token)._client_wrapper.get_headers()["Authorization"]
    except Exception as err:
        raise MediaError(f"Label Studio refused LABEL_STUDIO_API_KEY ({type(err).__name__}); "
                         "a personal access token may have expired") from None
    return header.split(" ", 1)[1]


def _without_query(url: str) -> str:
    """A URL fit for logs: presigned query strings carry credentials, and a task can hold a
    megabyte of URL."""
    return bounded(url.split("?", 1)[0] if "://" in url else url.split("&", 1)[0], 300)


class ImageFetcher:
    """Turns a task's image reference into an RGB array, with a disk cache of downloads that
    keeps the most recently used images within `cache_bytes`."""

    PRUNE_EVERY = 50  # fetches between looks at the cache size

    def __init__(
        self,
        cache_dir: Path,
        allowed_local_dir: Optional[Path],
        max_bytes: int,
        timeout_s: float,
        max_pixels: int,
        cache_bytes: int = 2 << 30,
        policy: Optional[DestinationPolicy] = None,
        min_short_side: Optional[int] = None,
    ) -> None:
        self.min_short_side = min_short_side
        self.cache_dir = Path(cache_dir) / "images"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._incoming = Path(cache_dir) / "incoming"
        self._incoming.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes
        self._fetches = 0
        self.allowed_local_dir = allowed_local_dir.resolve() if allowed_local_dir else None
        self.max_pixels = max_pixels
        self.policy = policy or DestinationPolicy()
        self.session = GuardedSession(self.policy, max_bytes, timeout_s)
        # Two threads fetching one URL must not both download it.
        self._locks: Dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock_for(self, reference: str) -> threading.Lock:
        with self._locks_guard:
            if len(self._locks) > 10_000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault(reference, threading.Lock())

    def fetch(self, reference: str, task_id: object, credentials: Credentials) -> Picture:
        """The image as (h, w, 3) uint8 RGB, EXIF orientation applied, and its full size: a JPEG
        of more than twice `min_short_side` is decoded reduced. Raises MediaError."""
        if not isinstance(reference, str) or not reference.strip():
            raise MediaError(f"task data holds no image reference ({type(reference).__name__})")
        reference = reference.strip()
        # the URL and whose credentials fetch it: one project's download is never served for another's
        key = hashlib.sha256(f"{credentials.identity}\0{reference}".encode()).hexdigest()
        with self._lock_for(key):
            path = self._local_file(reference, task_id, credentials, key)
            self._note_use(Path(path))
            try:
                return Picture(*read_rgb(path, self.max_pixels, self.min_short_side))
            except ImageError as err:
                if Path(path).parent == self.cache_dir:
                    Path(path).unlink(missing_ok=True)  # fetch it again next time, in case it changed
                raise MediaError(str(err)) from None

    def _local_file(self, reference: str, task_id: object, credentials: Credentials, key: str) -> str:
        try:
            parsed = urlparse(reference)
        except ValueError as err:  # "http://[::1", say
            raise MediaError(f"{_without_query(reference)} is not a valid URL ({err})") from None
        if parsed.scheme == "file" or (not parsed.scheme and not reference.startswith(_LS_PATH_PREFIXES)
                                       and not reference.startswith("/data/local-files")):
            return self._allowed_path(unquote(parsed.path) if parsed.scheme == "file" else reference)
        if reference.startswith("/data/local-files"):
            relative = (parse_qs(parsed.query).get("d") or [""])[-1]
            if self.allowed_local_dir is not None and relative:
                candidate = self._inside_allowed(self.allowed_local_dir / relative.lstrip("/"))
                if candidate is not None and candidate.is_file():
                    return str(candidate)
            reference = self._absolute(reference, credentials)  # served by Label Studio itself
        elif parsed.scheme not in ("http", "https") and not reference.startswith(_LS_PATH_PREFIXES) \
                and not reference.startswith(_CLOUD_SCHEMES):
            raise MediaError(f"unsupported image reference scheme {parsed.scheme!r}")
        cached = self.cache_dir / key
        if cached.is_file():
            return str(cached)
        try:
            if credentials.url and credentials.token:
                # exchanging a personal access token is a request of the SDK's own client: its
                # destination is checked here, as the guarded session checks every download's
                url = urlparse(credentials.url)
                self.policy.addresses(url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
            # The SDK's own cache names files by 8 hex digits of the URL alone; it downloads into
            # a folder of its own each time, and the file is kept under the full key.
            with tempfile.TemporaryDirectory(dir=self._incoming) as incoming, http_session(self.session):
                downloaded = get_local_path(
                    reference,
                    cache_dir=incoming,
                    hostname=credentials.url or "",
                    access_token=access_token(credentials),
                    task_id=task_id,
                    image_dir=_NO_LOCAL_UPLOADS,
                )
                os.replace(downloaded, cached)
            return str(cached)
        except MediaError:
            raise
        except DownloadRefused as err:
            raise MediaError(f"{_without_query(reference)}: {err}") from None
        except requests.HTTPError as err:
            status = err.response.status_code if err.response is not None else "?"
            hint = " (check LABEL_STUDIO_API_KEY)" if status in (401, 403) else ""
            last = self.session.last_failure()
            if last is not None and err.response is not None and last.url != err.response.url \
                    and last.status != status:
                # the SDK reports its first request's error when its fallback request fails
                raise MediaError(f"{last.reason} fetching {urlparse(last.url).path} (after HTTP {status} from "
                                 f"{urlparse(err.response.url).path})") from None
            raise MediaError(f"HTTP {status} fetching {_without_query(reference)}{hint}") from None
        except requests.RequestException as err:
            raise MediaError(f"cannot fetch {_without_query(reference)}: {type(err).__name__}") from None
        except (FileNotFoundError, ValueError) as err:
            message = str(err)
            raise MediaError(_NO_LABEL_STUDIO if "LABEL_STUDIO" in message or "hostname" in message
                             else message) from None

    def _note_use(self, path: Path) -> None:
        """Mark a cached file as recently used; now and then trim the cache to its size."""
        if path.parent != self.cache_dir:
            return
        path.touch(exist_ok=True)
        with self._locks_guard:
            self._fetches += 1
            due = self._fetches % self.PRUNE_EVERY == 0
        if due:
            removed = prune_cache(self.cache_dir, self.cache_bytes)
            if removed:
                log.info("image cache: removed %d least recently used files", removed)

    @staticmethod
    def _absolute(reference: str, credentials: Credentials) -> str:
        if not credentials.url:
            raise MediaError(_NO_LABEL_STUDIO)
        return credentials.url.rstrip("/") + "/" + reference.lstrip("/")

    def _inside_allowed(self, path: Path) -> Optional[Path]:
        resolved = path.resolve()
        if self.allowed_local_dir is None or not resolved.is_relative_to(self.allowed_local_dir):
            return None
        return resolved

    def _allowed_path(self, raw: str) -> str:
        if self.allowed_local_dir is None:
            raise MediaError("local file paths are not read (set RFCLIP_ALLOWED_LOCAL_DIR to allow a folder)")
        path = Path(raw)
        candidate = self._inside_allowed(path if path.is_absolute() else self.allowed_local_dir / path)
        if candidate is None:
            raise MediaError(f"path is outside the allowed folder RFCLIP_ALLOWED_LOCAL_DIR: {raw}")
        if not candidate.is_file():
            raise MediaError(f"no such file in the allowed folder: {raw}")
        return str(candidate)
