"""Retention warnings: a restore point near the stream's age limit, or already past its start."""

from __future__ import annotations

import pytest

from actors.stream_retention import classify
from cluster.cli import format_status
from cluster.settings import Settings

DAY_S = 86_400.0


def test_a_restore_point_well_inside_retention_is_fine() -> None:
    assert (
        classify(3, position=100, first_seq=1, oldest_needed_age_s=60, max_age_s=7 * DAY_S) is None
    )


def test_nothing_after_the_snapshot_or_no_age_limit_is_fine() -> None:
    assert classify(3, 100, 1, oldest_needed_age_s=None, max_age_s=7 * DAY_S) is None
    assert classify(3, 100, 1, oldest_needed_age_s=30 * DAY_S, max_age_s=None) is None


def test_a_restore_point_near_the_age_limit_is_a_warning() -> None:
    found = classify(3, 100, 1, oldest_needed_age_s=6 * DAY_S, max_age_s=7 * DAY_S)
    assert found is not None and found.level == "warning" and found.partition == 3
    assert "144.0 h old" in found.detail and "168.0 h" in found.detail


def test_a_stream_that_starts_after_the_restore_point_is_an_error() -> None:
    found = classify(5, position=100, first_seq=250, oldest_needed_age_s=10, max_age_s=DAY_S)
    assert found is not None and found.level == "error"
    assert "sequence 101" in found.detail and "starts at 250" in found.detail
    no_snapshot = classify(5, position=0, first_seq=2, oldest_needed_age_s=10, max_age_s=DAY_S)
    assert no_snapshot is not None and "without snapshot" in no_snapshot.detail
    assert classify(5, position=0, first_seq=1, oldest_needed_age_s=10, max_age_s=DAY_S) is None


def test_settings_refuse_a_retention_shorter_than_ten_checkpoint_intervals() -> None:
    with pytest.raises(ValueError, match="at least 10 times checkpoint_interval_s"):
        Settings(stream_max_age_s=300, checkpoint_interval_s=60)
    assert Settings(stream_max_age_s=300, checkpoint_interval_s=0).stream_max_age_s == 300


def test_status_text_shows_recovering_shards_snapshots_and_retention_warnings() -> None:
    status = {
        "shards": [
            {"shard": 0, "recovering": True, "detail": "shard 0 unavailable: recovering: x"},
            {
                "shard": 1,
                "users": 10,
                "applied_events": 99,
                "rejected": {},
                "partitions": [4, 5, 6, 7],
                "lag": {"4": 0},
                "freshness_ms": {"p50": 1.0, "p99": 2.0},
                "checkpoint": {"created_ms": 0, "bytes": 2_500_000},
            },
        ],
        "lag": {"4": 0},
        "dead_letters": {},
        "retention_warnings": [
            {"partition": 4, "position": 9, "level": "warning", "detail": "a restore needs..."}
        ],
    }
    text = format_status(status)
    assert "    0  recovering: shard 0 unavailable" in text
    assert "2.5 MB" in text
    assert "WARNING: partition 4: a restore needs..." in text


def test_status_text_shows_partition_ranges_and_the_last_live_rescale() -> None:
    shard = {
        "shard": 0,
        "users": 1,
        "applied_events": 1,
        "rejected": {},
        "partitions": [0, 1, 2, 5, 7, 8],
        "lag": {},
        "freshness_ms": {},
        "checkpoint": None,
    }
    rescale = {"from": 2, "to": 4, "took_s": 3.1, "moved": 4}
    status = {
        "shards": [shard],
        "lag": {},
        "dead_letters": {},
        "autoscaling": {
            "applied": True,
            "decisions": [
                {"current": 2, "desired": 4, "reason": "busy", "rescale": rescale},
                {"current": 4, "desired": 4, "reason": "steady"},
            ],
        },
    }
    text = format_status(status)
    assert "0-2,5,7-8" in text
    assert "autoscaling: 4 shards -> 4 applied (steady)" in text
    assert "last rescale: 2 -> 4 shards live in 3.1 s, 4 partitions handed over" in text
