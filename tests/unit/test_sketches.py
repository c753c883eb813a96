"""Sketches count within their stated bounds, merge like their streams, and snapshot."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from actors.sketches import CountMin, HyperLogLog, SketchError, SpaceSaving, stable_hash64


def _hll_of(ids: list[str], precision: int = 12) -> HyperLogLog:
    sketch = HyperLogLog(precision)
    sketch.add_many(ids)
    return sketch


def _zipf_keys(n: int, seed: int) -> list[str]:
    ranks = np.random.default_rng(seed).zipf(1.3, size=n)
    return [f"item-{r}" for r in ranks.tolist()]


# --------------------------------------------------------------------------- stable hash


def test_the_stable_hash_is_pinned_so_old_snapshots_stay_readable() -> None:
    ids = ["", "user-42", "é", "a-rather-long-identifier-over-two-words"]
    assert stable_hash64(ids).tolist() == [
        7175312947680778460,
        10611248202475562116,
        4573876370056193757,
        9733325995354458001,
    ]


def test_the_stable_hash_of_an_id_does_not_depend_on_its_batch() -> None:
    ids = ["a", "a\x00", "bb", "x" * 100, "user-7"]
    alone = [int(stable_hash64([i])[0]) for i in ids]
    assert stable_hash64(ids).tolist() == alone
    assert len(set(alone)) == len(ids)


# --------------------------------------------------------------------------- HyperLogLog


@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_hll_counts_many_distinct_ids_within_three_standard_errors(n: int) -> None:
    sketch = _hll_of([f"user-{i}" for i in range(n)])
    assert abs(sketch.count() - n) <= 3 * sketch.relative_error * n


def test_hll_counts_small_sets_within_three_ids() -> None:
    for n in range(1, 100):
        assert abs(_hll_of([f"u{i}" for i in range(n)]).count() - n) <= 3, n


def test_hll_ignores_repeats() -> None:
    ids = [f"user-{i % 500}" for i in range(20_000)]
    assert _hll_of(ids).count() == _hll_of(sorted(set(ids))).count()


def test_merging_two_hlls_equals_the_hll_of_the_union() -> None:
    a_ids = [f"user-{i}" for i in range(0, 60_000)]
    b_ids = [f"user-{i}" for i in range(40_000, 100_000)]
    merged = _hll_of(a_ids)
    merged.merge(_hll_of(b_ids))
    union = _hll_of(a_ids + b_ids)
    assert np.array_equal(merged.registers, union.registers)
    assert merged.count() == union.count()


def test_merging_hlls_of_different_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision_mismatch"):
        HyperLogLog(12).merge(HyperLogLog(10))


def test_hll_registers_are_identical_across_processes_with_different_hash_seeds() -> None:
    code = (
        "from actors.sketches import HyperLogLog; h = HyperLogLog(); "
        "h.add_many([f'user-{i}' for i in range(5000)]); "
        "print(hash('salted'), h.to_bytes().hex())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env={"PYTHONHASHSEED": seed},
            cwd=Path(__file__).resolve().parents[2],
        )
        for seed in ("1", "2")
    ]
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0][0] != outputs[1][0], "the seeds did not change Python's hash()"
    expected = _hll_of([f"user-{i}" for i in range(5000)]).to_bytes().hex()
    assert outputs[0][1] == outputs[1][1] == expected


def test_hll_survives_a_bytes_round_trip() -> None:
    sketch = _hll_of([f"user-{i}" for i in range(30_000)], precision=10)
    restored = HyperLogLog.from_bytes(sketch.to_bytes())
    assert restored.precision == 10
    assert np.array_equal(restored.registers, sketch.registers)
    assert restored.count() == sketch.count()


@pytest.mark.parametrize("data", [b"", b"nope", b"HLL\x01\x0c" + bytes(10)])
def test_hll_refuses_bytes_that_are_not_a_snapshot(data: bytes) -> None:
    with pytest.raises(SketchError):
        HyperLogLog.from_bytes(data)


# --------------------------------------------------------------------------- Space-Saving


def _assert_bounds_hold(sketch: SpaceSaving, truth: Counter[str]) -> None:
    monitored = {key: (count, error) for key, count, error in sketch.top(sketch.capacity)}
    for key, true_count in truth.items():
        if key in monitored:
            count, error = monitored[key]
            assert count - error <= true_count <= count, key
        else:
            assert true_count <= sketch.floor, key
    assert max(e for _, e in monitored.values()) <= sketch.total / sketch.capacity


def _true_top10(truth: Counter[str]) -> set[str]:
    ranked = truth.most_common(11)
    assert ranked[9][1] > ranked[10][1], "the true top-10 must be unambiguous"
    return {key for key, _ in ranked[:10]}


def test_space_saving_finds_the_true_top10_of_a_zipf_stream_within_its_bounds() -> None:
    keys = _zipf_keys(200_000, seed=7)
    sketch = SpaceSaving(capacity=100)
    for start in range(0, len(keys), 10_000):
        sketch.add_many(keys[start : start + 10_000])
    truth = Counter(keys)
    assert {key for key, _, _ in sketch.top(10)} == _true_top10(truth)
    assert sketch.total == len(keys)
    _assert_bounds_hold(sketch, truth)


def test_merging_space_saving_of_two_halves_finds_the_same_top10() -> None:
    keys = _zipf_keys(200_000, seed=11)
    left, right = SpaceSaving(capacity=100), SpaceSaving(capacity=100)
    left.add_many(keys[:100_000])
    right.add_many(keys[100_000:])
    left.merge(right)
    truth = Counter(keys)
    assert {key for key, _, _ in left.top(10)} == _true_top10(truth)
    _assert_bounds_hold(left, truth)


def test_space_saving_weights_count_like_repeats() -> None:
    weighted, repeated = SpaceSaving(capacity=10), SpaceSaving(capacity=10)
    weighted.add_many(["a", "b", "a"], weights=np.array([2.0, 5.0, 1.0]))
    repeated.add_many(["a"] * 3 + ["b"] * 5)
    assert weighted.top(2) == repeated.top(2) == [("b", 5.0, 0.0), ("a", 3.0, 0.0)]


def test_space_saving_refuses_negative_or_misshapen_weights() -> None:
    sketch = SpaceSaving(capacity=10)
    with pytest.raises(SketchError, match="bad_weights"):
        sketch.add_many(["a", "b"], weights=np.array([1.0, -1.0]))
    with pytest.raises(SketchError, match="bad_weights"):
        sketch.add_many(["a", "b"], weights=np.array([1.0]))


def test_decay_halves_counts_errors_and_total() -> None:
    sketch = SpaceSaving(capacity=20)
    sketch.add_many(_zipf_keys(20_000, seed=3))
    before = sketch.top(20)
    sketch.decay(0.5)
    assert sketch.top(20) == [(k, c / 2, e / 2) for k, c, e in before]
    assert sketch.total == 10_000


def test_space_saving_survives_a_json_round_trip_and_keeps_counting_the_same() -> None:
    sketch = SpaceSaving(capacity=50)
    sketch.add_many(_zipf_keys(50_000, seed=5))
    restored = SpaceSaving.from_dict(json.loads(json.dumps(sketch.to_dict())))
    assert restored.top(50) == sketch.top(50)
    more = _zipf_keys(10_000, seed=6)
    sketch.add_many(more)
    restored.add_many(more)
    assert restored.top(50) == sketch.top(50)


def test_space_saving_estimates_an_unmonitored_key_at_the_floor() -> None:
    sketch = SpaceSaving(capacity=5)
    sketch.add_many([f"k{i}" for i in range(10)] * 2)
    assert sketch.estimate("never-seen") == (sketch.floor, sketch.floor)


# --------------------------------------------------------------------------- Count-Min


def test_count_min_never_underestimates_and_overestimates_within_epsilon_n_as_stated() -> None:
    sketch = CountMin.from_error(epsilon=0.01, delta=0.01, seed=42)
    keys = [f"item-{r}" for r in np.random.default_rng(0).zipf(1.1, size=100_000).tolist()]
    sketch.add_many(keys)
    truth = Counter(keys)
    distinct = list(truth)
    over = sketch.estimate_many(distinct) - np.array([truth[k] for k in distinct])
    assert sketch.total == len(keys)
    assert over.min() >= 0
    assert np.mean(over > sketch.epsilon * sketch.total) <= sketch.delta


def test_count_min_counts_weights_like_repeats() -> None:
    weighted, repeated = CountMin(64, 3), CountMin(64, 3)
    weighted.add_many(["a", "b"], counts=np.array([3, 2]))
    repeated.add_many(["a", "a", "a", "b", "b"])
    assert weighted.to_bytes() == repeated.to_bytes()
    assert weighted.estimate("a") >= 3


def test_merging_count_mins_equals_the_count_min_of_both_streams() -> None:
    a, b, both = CountMin(128, 4, seed=1), CountMin(128, 4, seed=1), CountMin(128, 4, seed=1)
    a.add_many(["x", "y", "y"])
    b.add_many(["y", "z"])
    both.add_many(["x", "y", "y", "y", "z"])
    a.merge(b)
    assert a.to_bytes() == both.to_bytes()
    with pytest.raises(ValueError, match="shape_mismatch"):
        a.merge(CountMin(128, 4, seed=2))


def test_count_min_survives_a_bytes_round_trip() -> None:
    sketch = CountMin(100, 3, seed=9)
    sketch.add_many([f"k{i % 37}" for i in range(1000)])
    restored = CountMin.from_bytes(sketch.to_bytes())
    assert (
        restored.estimate_many(["k1", "k2"]).tolist() == sketch.estimate_many(["k1", "k2"]).tolist()
    )
