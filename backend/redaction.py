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


def redact(text: str) -> str:
    """`text` with URL credentials, query strings and tokens replaced by ***."""
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _QUERY.sub(rf"\1?{REDACTED}", text)
    text = _AUTH.sub(rf"\1\2{REDACTED}", text)
    return _KEY_VALUE.sub(rf"\1\2{REDACTED}", text)


def one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class SafeFormatter(logging.Formatter):
    """A Formatter whose message is one line (a traceback still follows it) and whose whole
    output, traceback included, is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        copy = logging.makeLogRecord(record.__dict__)
        copy.msg, copy.args = one_line(record.getMessage()), None
        return redact(super().format(copy))


def install(level: str, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """Root logging at `level`, through a SafeFormatter on every root handler."""
    logging.basicConfig(level=level, format=fmt)
    for name in ("", "gunicorn.error"):  # gunicorn's own log has handlers of its own
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(SafeFormatter(handler.formatter._fmt if handler.formatter else fmt))
