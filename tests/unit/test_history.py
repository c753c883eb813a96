"""History files into history frames and back to event batches (models/history.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from actors.batch import EventBatch
from actors.events import SOURCE_CODE, Source
from models.history import (
    COLUMNS,
    HistoryError,
    batch_to_frame,
    frame_to_batch,
    holdout_last,
    read_events,
    read_history,
    read_ratings,
    read_telco,
    split_by_time,
)

RATINGS = """userId,movieId,rating,timestamp
2,10,4.0,1000000100
1,10,3.5,1000000000
1,9,5.0,1000000000
1,3,4.0,1000000050
2,7,1.0,1000000100
2,99,4.5,1000000000
"""

MOVIES = """movieId,title,genres
3,"Three, Four (1999)",Drama|Romance
7,Seven (1995),Thriller
9,"Nine, The (2001)",(no genres listed)
10,Ten (1979),Comedy|Drama
"""

TELCO_HEADER = (
    "customerID,gender,SeniorCitizen,Partner,Dependents,tenure,PhoneService,MultipleLines,"
    "InternetService,OnlineSecurity,OnlineBackup,DeviceProtection,TechSupport,StreamingTV,"
    "StreamingMovies,Contract,PaperlessBilling,PaymentMethod,MonthlyCharges,TotalCharges,Churn"
)
TELCO = (
    TELCO_HEADER + "\n" + "7590-VHVEG,Female,0,Yes,No,1,No,No phone service,DSL,No,Yes,No,No,No,No,"
    "Month-to-month,Yes,Electronic check,29.85,29.85,No\n"
    + "4472-LVYGI,Female,1,Yes,Yes,0,No,No phone service,DSL,Yes,No,Yes,Yes,Yes,No,"
    'Two year,Yes,"Bank transfer (automatic)",52.55, ,Yes\n'
)
AT_MS = 1_700_000_000_000


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def ratings(tmp_path: Path) -> Path:
    return write(tmp_path / "ratings.csv", RATINGS)


@pytest.fixture
def movies(tmp_path: Path) -> Path:
    return write(tmp_path / "movies.csv", MOVIES)


def a_frame() -> pd.DataFrame:
    """A small frame using every column, missing values included."""
    batch = EventBatch(
        event_id=["e1", "e2", "e3", "e4"],
        user_id=["u1", "u2", "u1", "u2"],
        type=np.array([9, 0, 7, 3], dtype=np.uint8),  # identify, page_view, purchase, like
        ts=np.array([1_000, 2_000, 2_000, 3_500], dtype=np.int64) + 1_600_000_000_000,
        item_id=[None, "i1", "i2", "i1"],
        category=[None, "shoes", None, "shoes"],
        value=np.array([np.nan, np.nan, 19.5, np.nan]),
        source=np.full(4, SOURCE_CODE[Source.REPLAY], dtype=np.uint8),
        traits=[{"plan": "pro", "age": 31, "vip": True}, None, None, None],
        properties=[None, {"page": "/a"}, {"coupon": "X1", "n": 2.5}, None],
    )
    return batch_to_frame(batch)


# --- MovieLens ratings ---------------------------------------------------------------


def test_ratings_are_ordered_by_timestamp_then_numeric_movie_id(ratings: Path) -> None:
    frame = read_ratings(ratings)
    assert list(frame.columns) == list(COLUMNS)
    assert frame["item_id"].tolist() == ["9", "10", "99", "3", "7", "10"]  # 10 after 9
    assert frame["user_id"].tolist() == ["1", "1", "2", "1", "2", "2"]
    assert (
        frame["ts"].tolist()
        == [1_000_000_000_000] * 3 + [1_000_000_050_000] + [1_000_000_100_000] * 2
    )
    assert frame["event_id"].tolist()[0] == "ml-1-9-1000000000"


def test_equal_timestamp_and_movie_keep_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.csv",
        "userId,movieId,rating,timestamp\n5,1,1.0,1000000000\n4,1,2.0,1000000000\n",
    )
    assert read_ratings(path)["user_id"].tolist() == ["5", "4"]


def test_high_ratings_are_likes_and_the_rest_page_views(ratings: Path) -> None:
    frame = read_ratings(ratings)
    by_event = dict(zip(frame["event_id"], frame["type"], strict=True))
    assert by_event["ml-1-10-1000000000"] == "page_view"  # 3.5
    assert by_event["ml-1-3-1000000050"] == "like"  # exactly 4.0
    assert by_event["ml-2-7-1000000100"] == "page_view"
    assert frame["properties"].tolist()[0] == {"rating": 5.0}
    assert frame["value"].isna().all()
    assert frame["traits"].tolist() == [None] * len(frame)


def test_category_is_the_first_genre_and_none_without_one(ratings: Path, movies: Path) -> None:
    frame = read_ratings(ratings, movies)
    category = dict(zip(frame["item_id"], frame["category"], strict=True))
    assert category == {"9": None, "10": "Comedy", "99": None, "3": "Drama", "7": "Thriller"}


def test_category_is_none_without_a_movies_file(ratings: Path) -> None:
    assert read_ratings(ratings)["category"].tolist() == [None] * 6


def test_a_missing_ratings_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match=r"nope\.csv: no such file"):
        read_ratings(tmp_path / "nope.csv")


def test_a_ratings_file_without_a_column_says_which(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "userId,movieId,timestamp\n1,2,3\n")
    with pytest.raises(HistoryError, match=r"r\.csv: missing column\(s\) rating"):
        read_ratings(path)


def test_a_bad_rating_value_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "userId,movieId,rating,timestamp\n1,x,4.0,3\n")
    with pytest.raises(HistoryError, match=r"r\.csv: bad value"):
        read_ratings(path)


def test_a_movies_file_without_genres_is_a_clear_error(ratings: Path, tmp_path: Path) -> None:
    bad = write(tmp_path / "m.csv", "movieId,title\n1,A\n")
    with pytest.raises(HistoryError, match=r"m\.csv: missing column\(s\) genres"):
        read_ratings(ratings, bad)


# --- Telco ---------------------------------------------------------------------------


def test_telco_rows_become_identify_events_with_typed_traits(tmp_path: Path) -> None:
    frame, _ = read_telco(write(tmp_path / "telco.csv", TELCO), AT_MS)
    assert frame["user_id"].tolist() == ["7590-VHVEG", "4472-LVYGI"]
    assert frame["event_id"].tolist() == ["telco-7590-VHVEG", "telco-4472-LVYGI"]
    assert frame["type"].tolist() == ["identify", "identify"]
    assert frame["ts"].tolist() == [AT_MS, AT_MS]
    first, second = frame["traits"].tolist()
    assert len(first) == 19 and "customerID" not in first and "Churn" not in first
    assert first["SeniorCitizen"] == 0 and type(first["SeniorCitizen"]) is int
    assert first["tenure"] == 1 and type(first["tenure"]) is int
    assert first["MonthlyCharges"] == 29.85 and type(first["MonthlyCharges"]) is float
    assert first["TotalCharges"] == 29.85 and type(first["TotalCharges"]) is float
    assert first["gender"] == "Female" and first["Contract"] == "Month-to-month"
    assert second["PaymentMethod"] == "Bank transfer (automatic)"
    assert "TotalCharges" not in second and len(second) == 18  # blank: left out


def test_telco_labels_are_churn_yes_by_user(tmp_path: Path) -> None:
    _, labels = read_telco(write(tmp_path / "telco.csv", TELCO), AT_MS)
    assert labels.dtype == bool
    assert labels.to_dict() == {"7590-VHVEG": False, "4472-LVYGI": True}
    assert labels.index.name == "user_id"


def test_telco_events_pass_the_event_contract(tmp_path: Path) -> None:
    from actors.validation import ValidationPolicy, check_batch

    frame, _ = read_telco(write(tmp_path / "telco.csv", TELCO), AT_MS)
    assert check_batch(frame_to_batch(frame), ValidationPolicy()).rejected == []


def test_telco_without_churn_is_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "customerID,gender\n1,Male\n")
    with pytest.raises(HistoryError, match="Churn"):
        read_telco(path, AT_MS)


# --- JSON lines and Parquet ----------------------------------------------------------


def event(i: int, ts: object, **extra: object) -> dict[str, object]:
    return {"event_id": f"e{i}", "user_id": f"u{i % 2}", "type": "click", "ts": ts, **extra}


def write_jsonl(path: Path, records: list[dict[str, object]], blank_at: int = -1) -> Path:
    lines = [orjson.dumps(r).decode() for r in records]
    if blank_at >= 0:
        lines.insert(blank_at, "")
    return write(path, "\n".join(lines) + "\n")


def test_json_lines_take_rfc3339_and_epoch_ms_times_and_sort_by_time(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "events.jsonl",
        [
            event(1, "2024-05-01T12:00:00.250+02:00", item_id="a", category="c", value=1.5),
            event(2, 1_714_557_600_100, source="mobile", traits=None),  # 2024-05-01T10:00:00.1Z
            event(3, 1_714_557_600_100, properties={"k": "v"}),
        ],
        blank_at=1,
    )
    frame = read_events(path)
    assert frame["event_id"].tolist() == ["e2", "e3", "e1"]  # stable among equal times
    assert frame["ts"].tolist() == [1_714_557_600_100, 1_714_557_600_100, 1_714_557_600_250]
    last = frame.iloc[2]
    assert (last["item_id"], last["category"], last["value"]) == ("a", "c", 1.5)
    assert frame["properties"].tolist()[1] == {"k": "v"}
    assert frame["item_id"].tolist()[0] is None and math.isnan(frame["value"].tolist()[0])


def test_a_rejected_line_is_named_with_its_reason(tmp_path: Path) -> None:
    records = [event(1, 1_714_557_600_000), event(2, 1_714_557_600_000, colour="red")]
    records.append({"event_id": "e3", "user_id": "u", "type": "nope", "ts": 1_714_557_600_000})
    path = write_jsonl(tmp_path / "bad.jsonl", records, blank_at=0)
    with pytest.raises(HistoryError) as caught:
        read_events(path)
    message = str(caught.value)
    assert "bad.jsonl" in message and "2 of 3 events rejected" in message
    assert "first at line 3: unknown_field" in message and "colour" in message


def test_a_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl", orjson.dumps(event(1, 1)).decode() + "\n{oops\n")
    with pytest.raises(HistoryError, match=r"bad\.jsonl: line 2: invalid JSON"):
        read_events(path)


def test_parquet_round_trips_a_frame(tmp_path: Path) -> None:
    frame = a_frame()
    frame.to_parquet(tmp_path / "events.parquet")
    back = read_events(tmp_path / "events.parquet")
    pd.testing.assert_frame_equal(back, frame)


def test_parquet_with_a_timezone_aware_ts_column(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "event_id": ["a", "b"],
            "user_id": ["u", "u"],
            "type": ["like", "share"],
            "ts": pd.to_datetime(["2024-01-01T00:00:01.500Z", "2024-01-01T00:00:00.000Z"]),
            "item_id": ["i", None],
        }
    )
    table.to_parquet(tmp_path / "e.parquet")
    frame = read_events(tmp_path / "e.parquet")
    assert frame["event_id"].tolist() == ["b", "a"]
    assert frame["ts"].tolist() == [1_704_067_200_000, 1_704_067_201_500]
    assert frame["item_id"].tolist() == [None, "i"]


def test_a_bad_parquet_record_is_named(tmp_path: Path) -> None:
    pd.DataFrame({"event_id": ["a", ""], "user_id": ["u", "u"], "type": ["like"] * 2}).assign(
        ts=1_704_067_200_000
    ).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(HistoryError, match=r"1 of 2 events rejected; first at record 2"):
        read_events(tmp_path / "e.parquet")


# --- dispatch ------------------------------------------------------------------------


def test_read_history_dispatches_by_suffix_and_header(
    ratings: Path, movies: Path, tmp_path: Path
) -> None:
    pd.testing.assert_frame_equal(read_history(ratings, movies), read_ratings(ratings, movies))
    path = write_jsonl(tmp_path / "e.json", [event(1, 1_714_557_600_000)])
    assert read_history(path)["event_id"].tolist() == ["e1"]
    a_frame().to_parquet(tmp_path / "e.parquet")
    assert len(read_history(tmp_path / "e.parquet")) == 4


def test_read_history_refuses_an_unknown_file(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match=r"x\.txt: unsupported history file"):
        read_history(write(tmp_path / "x.txt", "hello"))
    with pytest.raises(HistoryError, match=r"t\.csv: not a ratings CSV"):
        read_history(write(tmp_path / "t.csv", TELCO))
    with pytest.raises(HistoryError, match="no such file"):
        read_history(tmp_path / "missing.jsonl")


# --- frames, batches, splits ---------------------------------------------------------


def test_frame_to_batch_and_back_is_exact() -> None:
    frame = a_frame()
    batch = frame_to_batch(frame)
    assert set(batch.source.tolist()) == {SOURCE_CODE[Source.REPLAY]}
    back = batch_to_frame(batch)
    pd.testing.assert_frame_equal(back, frame)
    assert back["traits"].tolist()[0] == {"plan": "pro", "age": 31, "vip": True}
    assert back["item_id"].tolist()[0] is None


def test_frame_to_batch_of_a_ratings_frame_keeps_every_column(ratings: Path, movies: Path) -> None:
    frame = read_ratings(ratings, movies)
    pd.testing.assert_frame_equal(batch_to_frame(frame_to_batch(frame)), frame)


def test_frame_to_batch_refuses_an_unknown_type() -> None:
    frame = a_frame()
    frame.loc[1, "type"] = "teleport"
    with pytest.raises(ValueError, match="teleport"):
        frame_to_batch(frame)


def test_holdout_last_takes_each_users_last_item_in_frame_order(ratings: Path) -> None:
    frame = read_ratings(ratings)
    train, test = holdout_last(frame)
    # user 1: 9, 10 at t0, 3 at t50 -> 3; user 2: 99 at t0, then 10 and 7 at t100 -> 10.
    assert test[["user_id", "item_id"]].values.tolist() == [["1", "3"], ["2", "10"]]
    assert train["event_id"].tolist() == [
        "ml-1-9-1000000000",
        "ml-1-10-1000000000",
        "ml-2-99-1000000000",
        "ml-2-7-1000000100",
    ]
    assert len(train) + len(test) == len(frame)


def test_holdout_last_ignores_rows_without_an_item() -> None:
    frame = a_frame()  # u1: identify (no item) then purchase i2; u2: view i1, like i1
    train, test = holdout_last(frame)
    assert test["event_id"].tolist() == ["e3", "e4"]
    assert train["event_id"].tolist() == ["e1", "e2"]


def test_split_by_time_puts_the_cutoff_in_the_second_part() -> None:
    frame = a_frame()
    cutoff = int(frame["ts"].iloc[1])
    before, after = split_by_time(frame, cutoff)
    assert before["event_id"].tolist() == ["e1"]
    assert after["event_id"].tolist() == ["e2", "e3", "e4"]
