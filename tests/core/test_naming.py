"""Archive and temporary names round-trip and never collide with configured names."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from ckptfn import ConfigError, Strategy
from ckptfn.core.naming import archive_name, archived_of, parse_temp_name, split_suffix, temp_name, timestamp_iso

filenames = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
moments = st.datetimes(timezones=st.timezones())


@given(filenames, moments, st.integers(0, 50))
def test_archive_names_are_recognised_as_versions_of_their_file(filename, moment, clash):
    name = archive_name(filename, moment, clash)
    assert archived_of(name, filename)
    assert name != filename
    assert split_suffix(name)[1] == split_suffix(filename)[1]


@given(filenames, moments)
def test_archive_names_sort_by_time_and_are_utc(filename, moment):
    later = moment + dt.timedelta(microseconds=1)
    assert archive_name(filename, moment) < archive_name(filename, later) or split_suffix(filename)[1] == ""
    assert timestamp_iso(moment).endswith("+00:00")


@given(filenames, st.integers(1, 2**22), st.text(min_size=1, max_size=40), st.from_regex(r"[0-9a-f]{4,12}", fullmatch=True))
def test_temp_names_are_hidden_parse_back_and_are_no_valid_strategy_filename(filename, pid, host, token):
    name = temp_name(filename, pid, host, token)
    assert name.startswith(".") and name.endswith(".tmp")
    parsed = parse_temp_name(name)
    assert parsed is not None and parsed[0] == pid
    try:
        Strategy("m", filename=name)
    except ConfigError:
        pass
    else:
        raise AssertionError("a temporary name must never be a configurable filename")


@given(filenames)
def test_configured_names_are_never_mistaken_for_temp_files(filename):
    assert parse_temp_name(filename) is None
