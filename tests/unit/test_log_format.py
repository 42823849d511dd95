"""The log formatters' time stamps: computed once a second (strftime per line was ~1.4 µs of a
~13 µs line), the same text as logging's own formatting, across second boundaries."""
from __future__ import annotations

import json
import logging
import time

from macp_runtime.vocabulary.logs import HumanFormatter, JsonFormatter

STANDARD = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def _record(created: float) -> logging.LogRecord:
    record = logging.getLogger("macp_runtime.test").makeRecord(
        "macp_runtime.test", logging.INFO, __file__, 1, "session started", (), None,
        extra={"fields": {"session_id": "s-1", "mode": "macp.mode.decision.v1"}})
    record.created = created
    record.msecs = int((created - int(created)) * 1000)
    return record


def test_the_human_time_stamp_is_loggings_own_text_in_the_same_second_and_after_it():
    human = HumanFormatter()
    for created in (1_796_472_994.001, 1_796_472_994.999, 1_796_472_995.0, 1_796_472_995.5, 1_000.25):
        record = _record(created)
        assert human.formatTime(record) == STANDARD.formatTime(record)
        line = human.format(record)
        assert line.startswith(STANDARD.formatTime(record) + " INFO macp_runtime.test: session started")
        assert line.endswith(" session_id=s-1 mode=macp.mode.decision.v1")


def test_the_json_time_stamp_is_utc_with_milliseconds_in_the_same_second_and_after_it():
    formatter = JsonFormatter()
    for created in (1_796_472_994.001, 1_796_472_994.999, 1_796_472_995.0, 1_000.25):
        doc = json.loads(formatter.format(_record(created)))
        second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        assert doc["ts"] == f"{second}.{int((created - int(created)) * 1000):03d}Z"
        assert doc["msg"] == "session started" and doc["session_id"] == "s-1"
