"""Backend settings: read from the environment once, at start, into one dataclass.

A wrong value stops the server at start with a message that names the variable.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping, Optional, Tuple, TypeVar, Union

from rfclip_engine.config import MODES, PRECISIONS

from .redaction import redact

T = TypeVar("T")
LS_PREDICT_TIMEOUT_S = 100.0  # Label Studio drops a /predict answer that takes longer


class SettingsError(ValueError):
    """An environment variable has a value the backend cannot use."""


@dataclass(frozen=True)
class Settings:
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    weights_tag: Optional[str] = None
    distraction_dims: Union[None, str, Tuple[int, ...]] = None
    device: str = "auto"
    mode: str = "rfclip"
    pamr: bool = False
    cuda_graphs: bool = True
    triton_kernels: bool = True
    batch_size: Optional[int] = None  # crops per encoder forward (None: rfclip_engine's default_batch_size)
    precision: str = "auto"  # or one of PRECISIONS ("auto": rfclip_engine's default_precision)
    redis_url: Optional[str] = None
    queue_name: str = "rfclip"
    job_timeout_s: int = 3600
    job_lease_s: float = 45.0
    push_part: Optional[int] = None  # tasks per push inside a chunk (None: the whole chunk at once)
    label_studio_url: Optional[str] = None
    label_studio_api_key: Optional[str] = field(default=None, repr=False)
    basic_auth_user: Optional[str] = None
    basic_auth_pass: Optional[str] = field(default=None, repr=False)
    allowed_local_dir: Optional[Path] = None
    allow_private_urls: bool = False
    max_image_pixels: int = 50_000_000
    max_download_bytes: int = 64 * 1024 * 1024
    fetch_timeout_s: float = 20.0
    predict_budget_s: float = 80.0
    max_request_bytes: int = 32 * 1024 * 1024
    max_queries: int = 2000
    max_projects: int = 1000
    cache_dir: Path = Path.home() / ".cache" / "rfclip"
    image_cache_mb: int = 2048
    prototypes: bool = True
    prototype_k: float = 0.5
    prototype_cap: float = 0.9
    prototype_max_annotations: int = 2000
    log_level: str = "INFO"

    @property
    def basic_auth(self) -> Optional[Tuple[str, str]]:
        if self.basic_auth_user and self.basic_auth_pass:
            return self.basic_auth_user, self.basic_auth_pass
        return None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        """Parse the RFCLIP_* and Label Studio variables; raise SettingsError naming the bad one."""

        def get(name: str, parse: Callable[[str], T], default: T) -> T:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                return parse(raw)
            except (ValueError, TypeError) as err:
                raise SettingsError(f"{name}={raw!r}: {err}") from None

        user, password = env.get("BASIC_AUTH_USER") or None, env.get("BASIC_AUTH_PASS") or None
        if bool(user) != bool(password):
            raise SettingsError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        url, key = env.get("LABEL_STUDIO_URL", "").strip(), env.get("LABEL_STUDIO_API_KEY", "").strip()
        if key and not url:
            raise SettingsError("LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not: the key is only ever "
                                "sent to LABEL_STUDIO_URL, so set both (or neither, to use what /setup sends)")
        defaults = cls()
        settings = cls(
            model=get("RFCLIP_MODEL", str, defaults.model),
            pretrained=get("RFCLIP_PRETRAINED", str, defaults.pretrained),
            weights_tag=get("RFCLIP_WEIGHTS_TAG", str, None),
            distraction_dims=get("RFCLIP_DISTRACTION_DIMS", _parse_dims, None),
            device=get("RFCLIP_DEVICE", str, defaults.device),
            mode=get("RFCLIP_MODE", _choice(MODES), defaults.mode),
            pamr=get("RFCLIP_PAMR", _parse_bool, defaults.pamr),
            cuda_graphs=get("RFCLIP_CUDA_GRAPHS", _parse_bool, defaults.cuda_graphs),
            triton_kernels=get("RFCLIP_TRITON_KERNELS", _parse_bool, defaults.triton_kernels),
            batch_size=get("RFCLIP_BATCH_SIZE", _positive(int), None),
            precision=get("RFCLIP_PRECISION", _choice(("auto",) + PRECISIONS), defaults.precision),
            redis_url=get("REDIS_URL", _parse_redis_url, None),
            queue_name=get("RFCLIP_QUEUE", _parse_queue_name, defaults.queue_name),
            job_timeout_s=get("RFCLIP_JOB_TIMEOUT_S", _positive(int), defaults.job_timeout_s),
            job_lease_s=get("RFCLIP_JOB_LEASE_S", _positive(float), defaults.job_lease_s),
            push_part=get("RFCLIP_PUSH_PART", _positive(int), None),
            label_studio_url=get("LABEL_STUDIO_URL", _parse_http_url, None),
            label_studio_api_key=key or None,
            basic_auth_user=user,
            basic_auth_pass=password,
            allowed_local_dir=get("RFCLIP_ALLOWED_LOCAL_DIR", _parse_dir, None),
            allow_private_urls=get("RFCLIP_ALLOW_PRIVATE_URLS", _parse_bool, defaults.allow_private_urls),
            max_image_pixels=get("RFCLIP_MAX_IMAGE_PIXELS", _positive(int), defaults.max_image_pixels),
            max_download_bytes=get("RFCLIP_MAX_DOWNLOAD_BYTES", _positive(int), defaults.max_download_bytes),
            fetch_timeout_s=get("RFCLIP_FETCH_TIMEOUT_S", _positive(float), defaults.fetch_timeout_s),
            predict_budget_s=get("RFCLIP_PREDICT_BUDGET_S", _parse_budget, defaults.predict_budget_s),
            max_request_bytes=get("RFCLIP_MAX_REQUEST_BYTES", _positive(int), defaults.max_request_bytes),
            max_queries=get("RFCLIP_MAX_QUERIES", _positive(int), defaults.max_queries),
            max_projects=get("RFCLIP_MAX_PROJECTS", _positive(int), defaults.max_projects),
            cache_dir=get("RFCLIP_CACHE_DIR", lambda raw: Path(raw).expanduser(), defaults.cache_dir),
            image_cache_mb=get("RFCLIP_IMAGE_CACHE_MB", _positive(int), defaults.image_cache_mb),
            prototypes=get("RFCLIP_PROTOTYPES", _parse_bool, defaults.prototypes),
            prototype_k=get("RFCLIP_PROTOTYPE_K", _positive(float), defaults.prototype_k),
            prototype_cap=get("RFCLIP_PROTOTYPE_CAP", _fraction, defaults.prototype_cap),
            prototype_max_annotations=get("RFCLIP_PROTOTYPE_MAX_ANNOTATIONS", _positive(int),
                                          defaults.prototype_max_annotations),
            log_level=get("LOG_LEVEL", _choice(("DEBUG", "INFO", "WARNING", "ERROR"), upper=True), defaults.log_level),
        )
        if settings.allowed_local_dir is not None:
            _check_allowed_dir(settings.allowed_local_dir, settings, env)
        return settings

    def describe(self) -> dict:
        """Settings as a JSON-able dict with secrets masked, for logs and the status endpoint."""
        secret = {"label_studio_api_key", "basic_auth_pass"}
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in secret:
                value = "***" if value else None
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, str):
                value = redact(value)
            out[f.name] = value
        return out


def _check_allowed_dir(allowed: Path, settings: "Settings", env: Mapping[str, str]) -> None:
    """RFCLIP_ALLOWED_LOCAL_DIR hands its whole tree to anyone who can send a task: it must not
    hold the backend's own cache, weights, code or the home folder (keys, .netrc, shell history)."""
    import rfclip_engine

    own = {"the root folder": Path("/"), "the home folder": Path.home(),
           "RFCLIP_CACHE_DIR": settings.cache_dir, "the backend's code": Path(rfclip_engine.__file__).parent.parent}
    for name in ("HF_HOME", "XDG_CACHE_HOME", "VIRTUAL_ENV"):
        if env.get(name):
            own[name] = Path(env[name])
    if Path(settings.pretrained).is_file():
        own["RFCLIP_PRETRAINED"] = Path(settings.pretrained)
    for what, path in own.items():
        resolved = path.expanduser().resolve()
        if resolved == allowed or resolved.is_relative_to(allowed):
            raise SettingsError(f"RFCLIP_ALLOWED_LOCAL_DIR={allowed} contains {what} ({resolved}); anyone who can "
                                "send a task could read it: allow only the folder that holds the images")


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = kind(raw)
        if value <= 0:
            raise ValueError("must be positive")
        return value

    return parse


def _choice(options: Tuple[str, ...], upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.upper() if upper else raw
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value

    return parse


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


def _parse_budget(raw: str) -> float:
    value = float(raw)
    if not 0 < value < LS_PREDICT_TIMEOUT_S:
        raise ValueError(f"must be between 0 and Label Studio's {LS_PREDICT_TIMEOUT_S:g} s predict timeout")
    return value


def _parse_dims(raw: str) -> Union[str, Tuple[int, ...]]:
    if Path(raw).is_file():
        return raw
    try:
        return tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError("expected a calibration file or comma-separated channel indices") from None


def _parse_http_url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return raw.rstrip("/")


def _parse_redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected redis://host:port/db, rediss://... or unix://...")
    return raw


def _parse_queue_name(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", raw):
        raise ValueError("expected up to 64 letters, digits, '.', '_' or '-'")
    return raw


def _parse_dir(raw: str) -> Path:
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        raise ValueError("not an existing directory")
    return path
