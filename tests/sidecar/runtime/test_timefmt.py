"""chaperone_sidecar.timefmt: the one RFC 3339 parser/formatter every ApprovalRequest reader uses."""

from __future__ import annotations

import datetime as dt

import pytest

from chaperone_sidecar.timefmt import (
    epoch_to_rfc3339, format_rfc3339, parse_rfc3339, rfc3339_to_epoch,
)

UTC = dt.timezone.utc


@pytest.mark.parametrize("text, expected", [
    ("2030-01-02T03:04:05Z", dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2030-01-02T03:04:05z", dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),   # RFC 3339: any case
    ("2030-01-02t03:04:05Z", dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2030-01-02T05:04:05.5+02:00", dt.datetime(2030, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)),
    ("2030-01-02T03:04:05", dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),    # no offset: UTC
])
def test_parse_reads_what_the_apiserver_and_clients_write(text, expected):
    assert parse_rfc3339(text) == expected
    assert rfc3339_to_epoch(text) == expected.timestamp()


@pytest.mark.parametrize("value", [None, "", "nonsense", "2030-13-01T00:00:00Z", 1893456000, ["x"]])
def test_unreadable_is_none_never_an_exception(value):
    assert parse_rfc3339(value) is None and rfc3339_to_epoch(value) is None


def test_format_is_utc_to_the_second_and_round_trips():
    when = dt.datetime(2030, 1, 2, 5, 4, 5, 999999, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert format_rfc3339(when) == "2030-01-02T03:04:05Z"
    assert epoch_to_rfc3339(when.timestamp()) == "2030-01-02T03:04:05Z"
    assert parse_rfc3339(format_rfc3339(when)) == when.replace(microsecond=0)
