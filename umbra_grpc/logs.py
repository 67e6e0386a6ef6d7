"""Logging set-up: one JSON object per line (`json`) or a readable line (`text`).

Both formats carry the `extra` fields of a record (the access log's `method`, `code`,
`duration_ms`, `correlation_id`, ...): JSON as keys of the object, text as `key=value` pairs
after the message. `configure_logging` may be called again (tests, the CLI): it replaces the
handler it installed before instead of adding a second one, and leaves other handlers alone.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

LOG_FORMATS = ("json", "text")

# Attributes every LogRecord has; anything else on a record came in through `extra`.
_BLANK_RECORD = logging.LogRecord("", logging.INFO, "", 0, "", (), None)
_STANDARD_ATTRIBUTES = frozenset(vars(_BLANK_RECORD)) | {"message", "asctime", "taskName"}


def configure_logging(log_format: str, level: str, *, stream: TextIO | None = None) -> None:
    """Sends the root logger's records to `stream` (stderr) in `log_format` at `level`."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _UmbraHandler):
            root.removeHandler(handler)
            handler.close()
    handler = _UmbraHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`, then any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        fields = " ".join(f"{key}={_text(value)}" for key, value in extra_fields(record).items())
        if fields:
            line = f"{line} {fields}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record got through `extra=`."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRIBUTES and not key.startswith("_")
    }


class _UmbraHandler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging` installs (so a second call can find and replace it)."""


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: object) -> str:
    text = "-" if value is None else str(value)
    if not text or any(char.isspace() or char in '"=' for char in text):
        return json.dumps(text, ensure_ascii=False)
    return text
