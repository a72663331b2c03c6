"""Log lines: JSON for machines with the fields to find them by, text for people."""

from __future__ import annotations

import io
import json
import logging
import sys
import uuid
from collections.abc import Iterator

import pytest

from engine import correlation
from engine.cli.logs import JsonFormatter, configure, log_format


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _line(record: logging.LogRecord) -> dict[str, object]:
    parsed = json.loads(JsonFormatter().format(record))
    assert isinstance(parsed, dict)
    return parsed


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("engine.lane", logging.WARNING, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_a_json_line_carries_the_fields_passed_and_no_others() -> None:
    line = _line(
        _record(
            'order_search: "dead-lettering" offset 7',
            projection="order_search",
            partition=3,
            offset=7,
            secret="not ours to publish",
        )
    )
    assert line["message"] == 'order_search: "dead-lettering" offset 7'
    assert (line["level"], line["logger"]) == ("warning", "engine.lane")
    assert (line["projection"], line["partition"], line["offset"]) == ("order_search", 3, 7)
    assert "secret" not in line
    assert isinstance(line["pid"], int) and str(line["time"]).endswith("+00:00")


def test_the_bound_correlation_id_is_on_every_line_unless_the_call_names_one() -> None:
    bound, named = uuid.uuid4(), uuid.uuid4()
    assert "correlation_id" not in _line(_record("outside"))
    with correlation.bound(bound):
        assert _line(_record("inside"))["correlation_id"] == str(bound)
        assert _line(_record("named", correlation_id=named))["correlation_id"] == str(named)
    assert correlation.current() is None


def test_a_failure_keeps_its_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    error = _line(record)["error"]
    assert isinstance(error, str) and "ValueError: boom" in error and "Traceback" in error


def test_auto_is_text_on_a_terminal_and_json_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINE_OPS__LOG_FORMAT", raising=False)
    assert log_format(_Tty()) == "text"
    assert log_format(io.StringIO()) == "json"
    monkeypatch.setenv("ENGINE_OPS__LOG_FORMAT", "text")
    assert log_format(io.StringIO()) == "text"
    monkeypatch.setenv("ENGINE_OPS__LOG_FORMAT", "JSON")
    assert log_format(_Tty()) == "json"


def test_an_unknown_format_warns_and_falls_back_to_auto(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ENGINE_OPS__LOG_FORMAT", "xml")
    assert log_format(io.StringIO()) == "json"
    assert "ENGINE_OPS__LOG_FORMAT='xml' is not one of auto, json, text" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_configure_writes_json_lines_to_a_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINE_OPS__LOG_FORMAT", raising=False)
    out = io.StringIO()
    configure("info", stream=out)
    logging.getLogger("engine.test").info("hello %s", "world", extra={"projection": "p"})
    logging.getLogger("engine.test").debug("not at info")
    (line,) = [json.loads(text) for text in out.getvalue().splitlines()]
    assert line["message"] == "hello world" and line["projection"] == "p"


def test_a_header_that_is_not_a_uuid_is_no_correlation_id() -> None:
    value = uuid.uuid4()
    assert correlation.parse(str(value)) == value
    assert correlation.parse(str(value).encode()) == value
    assert correlation.parse(b"order-7") is None
    assert correlation.parse(None) is None
    assert correlation.parse("") is None
