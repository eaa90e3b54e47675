"""Secrets out of log lines, and one log record per line.

Every handler the backend installs formats through `SafeFormatter`, so no line at any level,
ours or a library's (the SDK logs whole URLs, presigned queries included), carries a password
inside a URL, a query string, or an Authorization token; and a newline inside a logged request
value cannot start a forged line.
"""
from __future__ import annotations

import logging
import re

# user:password@ (or :password@, as Redis URLs have it) after a scheme
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]*@")
# the query of any URL: presigned S3/GCS/Azure links carry their signature and credential there
_QUERY = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s?'\"]*)\?[^\s'\"]*")
_AUTH = re.compile(r"(?i)\b(token|bearer|basic)(\s+|=)[A-Za-z0-9._~+/=-]{8,}")
_KEY_VALUE = re.compile(r"(?i)\b(access_token|api_key|refresh|password|secret)(['\"]?\s*[:=]\s*['\"]?)[^\s'\",&}]+")
REDACTED = "***"
# characters of one log message: a task's image URL of a megabyte made lines of a megabyte, three
# per download tried (urllib3's retries name the URL too)
MAX_MESSAGE = 4000


def redact(text: str) -> str:
    """`text` with URL credentials, query strings and tokens replaced by ***."""
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _QUERY.sub(rf"\1?{REDACTED}", text)
    text = _AUTH.sub(rf"\1\2{REDACTED}", text)
    return _KEY_VALUE.sub(rf"\1\2{REDACTED}", text)


def one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text`, cut to `limit` characters and saying how many were left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class SafeFormatter(logging.Formatter):
    """A Formatter whose message is one line of at most MAX_MESSAGE characters (a traceback
    still follows it) and whose whole output, traceback included, is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        copy = logging.makeLogRecord(record.__dict__)
        # redacted before it is cut, so that a cut never leaves part of a secret behind
        copy.msg, copy.args = bounded(redact(one_line(record.getMessage()))), None
        return redact(super().format(copy))


def install(level: str, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """Root logging at `level`, through a SafeFormatter on every root handler."""
    logging.basicConfig(level=level, format=fmt)
    for name in ("", "gunicorn.error"):  # gunicorn's own log has handlers of its own
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(SafeFormatter(handler.formatter._fmt if handler.formatter else fmt))
