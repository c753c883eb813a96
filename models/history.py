"""History as one table: read past events from files and turn them into event batches.

Training, evaluation and ``audience replay`` all start from the same
*history frame*, a pandas DataFrame with the columns of :data:`COLUMNS` in that
order:

=============  ==========  ====================================================
column         dtype       meaning
=============  ==========  ====================================================
``event_id``   object str  producer-unique id
``user_id``    object str  the partition key
``type``       object str  an :class:`~actors.events.EventType` value
``ts``         int64       event time, epoch milliseconds
``item_id``    object      str, or None
``category``   object      str, or None
``value``      float64     NaN when the event has none
``traits``     object      dict, or None
``properties`` object      dict, or None
=============  ==========  ====================================================

Rows are in replay order: by event time, ties broken by a per-source item key
(MovieLens: the numeric movie id), with a stable sort. That order is part of the
evaluation protocol (the last interaction of a user is its test item), so every
reader here returns frames already in it and every helper keeps it.

Files are checked once, here, by the event contract (``actors.validation``);
a history with a bad record is refused as a whole, because a silently shorter
history would skew whatever is trained or evaluated on it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from actors.batch import EventBatch
from actors.errors import AudienceError
from actors.events import EVENT_TYPES, SOURCE_CODE, TYPE_CODE, Source
from actors.validation import ValidationPolicy, parse_events

COLUMNS: tuple[str, ...] = (
    "event_id",
    "user_id",
    "type",
    "ts",
    "item_id",
    "category",
    "value",
    "traits",
    "properties",
)
RATINGS_COLUMNS: tuple[str, ...] = ("userId", "movieId", "rating", "timestamp")
MOVIES_COLUMNS: tuple[str, ...] = ("movieId", "genres")
TELCO_ID, TELCO_LABEL = "customerID", "Churn"
LIKE_RATING = 4.0
NO_GENRES = "(no genres listed)"
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)

_TYPE_CODE_BY_NAME = {t.value: code for t, code in TYPE_CODE.items()}
_REPLAY = SOURCE_CODE[Source.REPLAY]
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class HistoryError(AudienceError):
    """A history file cannot be used: missing, unreadable, or not the expected shape.

    Attributes:
        path: the file.
        detail: what exactly is wrong, for people.
    """

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


# --- readers -------------------------------------------------------------------------


def read_ratings(ratings: Path, movies: Path | None = None) -> pd.DataFrame:
    """MovieLens ratings as a history frame, in the protocol's (timestamp, movieId) order.

    A rating of 4 or more is a ``like``, anything lower a ``page_view`` (the user
    watched it); the rating itself stays in ``properties["rating"]``. The
    category is the movie's first genre when ``movies`` is given.

    Args:
        ratings: ``ratings.csv`` with header ``userId,movieId,rating,timestamp``
            (timestamp in epoch seconds).
        movies: optional ``movies.csv`` (``movieId,title,genres``; genres
            separated by ``|``).

    Raises:
        HistoryError: a file is missing, lacks a column or holds a bad value.
    """
    raw = _read_csv(
        ratings,
        RATINGS_COLUMNS,
        dtype={"userId": "int64", "movieId": "int64", "rating": "float64", "timestamp": "int64"},
    )
    # np.lexsort is stable: equal (timestamp, movieId) keep file order.
    order = np.lexsort((raw["movieId"].to_numpy(), raw["timestamp"].to_numpy()))
    raw = raw.iloc[order]
    users = raw["userId"].tolist()
    movie_ids = raw["movieId"].tolist()
    seconds = raw["timestamp"].tolist()
    rating = raw["rating"].tolist()
    genre = _first_genres(movies) if movies is not None else {}
    n = len(raw)
    return _frame(
        event_id=[f"ml-{u}-{m}-{s}" for u, m, s in zip(users, movie_ids, seconds, strict=True)],
        user_id=[str(u) for u in users],
        type=["like" if r >= LIKE_RATING else "page_view" for r in rating],
        ts=raw["timestamp"].to_numpy(np.int64) * 1000,
        item_id=[str(m) for m in movie_ids],
        category=[genre.get(m) for m in movie_ids],
        value=np.full(n, np.nan),
        traits=[None] * n,
        properties=[{"rating": float(r)} for r in rating],
    )


def read_telco(path: Path, at_ms: int) -> tuple[pd.DataFrame, pd.Series]:
    """The IBM Telco churn table as one ``identify`` event per customer, and the labels.

    Traits are every column but ``customerID`` and ``Churn``; a column whose
    non-blank values are all numbers becomes int or float, others stay strings.
    A blank cell (``TotalCharges`` for new customers) leaves its key out rather
    than inventing a zero.

    Args:
        path: the CSV file.
        at_ms: event time of every identify event, epoch milliseconds.

    Returns:
        The history frame (file order) and a bool Series of churn labels indexed
        by ``user_id``.

    Raises:
        HistoryError: the file is missing or lacks ``customerID`` / ``Churn``.
    """
    raw = _read_csv(path, (TELCO_ID, TELCO_LABEL), dtype=str, keep_default_na=False)
    ids = [s.strip() for s in raw[TELCO_ID].tolist()]
    if any(not i for i in ids):
        raise HistoryError(path, f"a row has an empty {TELCO_ID}")
    trait_columns = [c for c in raw.columns if c not in (TELCO_ID, TELCO_LABEL)]
    columns = {c: _typed_column(raw[c].tolist()) for c in trait_columns}
    traits: list[dict[str, Any] | None] = [
        {c: columns[c][i] for c in trait_columns if columns[c][i] is not None}
        for i in range(len(raw))
    ]
    n = len(raw)
    frame = _frame(
        event_id=[f"telco-{i}" for i in ids],
        user_id=ids,
        type=["identify"] * n,
        ts=np.full(n, at_ms, dtype=np.int64),
        item_id=[None] * n,
        category=[None] * n,
        value=np.full(n, np.nan),
        traits=traits,
        properties=[None] * n,
    )
    labels = pd.Series(
        [s.strip() == "Yes" for s in raw[TELCO_LABEL].tolist()],
        index=pd.Index(ids, name="user_id", dtype=object),
        name="churn",
        dtype=bool,
    )
    return frame, labels


def read_events(path: Path, policy: ValidationPolicy | None = None) -> pd.DataFrame:
    """Events in the platform's JSON shape, from JSON lines or Parquet, sorted by time.

    Every record goes through the same contract as ``POST /v1/events``
    (:func:`actors.validation.parse_events`); ``ts`` may be RFC 3339 with a
    timezone or an integer of epoch milliseconds. ``source`` is accepted and
    dropped: replayed events are ``replay`` events.

    Args:
        path: a ``.jsonl`` / ``.json`` file with one JSON object per line, or a
            ``.parquet`` file with one column per event field.
        policy: validation limits; the defaults accept history back to 1990.

    Raises:
        HistoryError: the file is missing or unreadable, or any record is
            rejected (the message names how many and the first one).
    """
    _must_exist(path)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        records, lines = _json_lines(path)
    elif suffix in PARQUET_SUFFIXES:
        records = _parquet_records(path)
        lines = list(range(1, len(records) + 1))
    else:
        raise HistoryError(path, f"expected {'/'.join(JSON_SUFFIXES + PARQUET_SUFFIXES)} file")
    raw = b"[" + b",".join(records) + b"]"
    checked = parse_events(raw, policy or ValidationPolicy())
    if checked.rejected:
        first = checked.rejected[0]
        where = "record" if suffix in PARQUET_SUFFIXES else "line"
        at = f"{where} {lines[first.index]}" if first.index >= 0 else "the file"
        raise HistoryError(
            path,
            f"{len(checked.rejected)} of {len(records)} events rejected; first at {at}:"
            f" {first.reason.value} ({first.detail})",
        )
    frame = batch_to_frame(checked.batch)
    order = np.argsort(frame["ts"].to_numpy(), kind="stable")
    return frame.iloc[order].reset_index(drop=True)


def read_history(path: Path, movies: Path | None = None) -> pd.DataFrame:
    """Any supported history file as a history frame, chosen by its suffix and header.

    A ``.csv`` must be MovieLens ratings (header ``userId,movieId,rating,timestamp``);
    ``.jsonl`` / ``.json`` / ``.parquet`` hold platform events (:func:`read_events`).

    Raises:
        HistoryError: the file is missing or of no supported kind.
    """
    _must_exist(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding="utf-8", errors="replace") as f:
            header = [c.strip().strip('"') for c in f.readline().strip().split(",")]
        if tuple(header[: len(RATINGS_COLUMNS)]) == RATINGS_COLUMNS:
            return read_ratings(path, movies)
        raise HistoryError(
            path,
            f"not a ratings CSV: header must start with {','.join(RATINGS_COLUMNS)},"
            f" got {','.join(header[:4]) or 'nothing'}",
        )
    if suffix in JSON_SUFFIXES + PARQUET_SUFFIXES:
        return read_events(path)
    raise HistoryError(
        path, "unsupported history file: expected a ratings .csv, .jsonl, .json or .parquet"
    )


# --- frames and batches ----------------------------------------------------------------


def frame_to_batch(df: pd.DataFrame) -> EventBatch:
    """The columnar batch of a history frame, every event with source ``replay``.

    Raises:
        ValueError: a column is missing or ``type`` holds an unknown event type.
    """
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"not a history frame: missing columns {', '.join(missing)}")
    types = df["type"].tolist()
    try:
        codes = np.fromiter((_TYPE_CODE_BY_NAME[t] for t in types), np.uint8, len(types))
    except KeyError as exc:
        raise ValueError(f"unknown event type {exc.args[0]!r} in the history frame") from None
    n = len(df)
    return EventBatch(
        event_id=[str(x) for x in df["event_id"].tolist()],
        user_id=[str(x) for x in df["user_id"].tolist()],
        type=codes,
        ts=df["ts"].to_numpy(np.int64, copy=True),
        item_id=_optional(df["item_id"].tolist()),
        category=_optional(df["category"].tolist()),
        value=df["value"].to_numpy(np.float64, copy=True),
        source=np.full(n, _REPLAY, dtype=np.uint8),
        traits=_optional(df["traits"].tolist()),
        properties=_optional(df["properties"].tolist()),
    )


def batch_to_frame(batch: EventBatch) -> pd.DataFrame:
    """A history frame holding a batch's events in batch order (``source`` is dropped)."""
    return _frame(
        event_id=list(batch.event_id),
        user_id=list(batch.user_id),
        type=[EVENT_TYPES[c].value for c in batch.type.tolist()],
        ts=np.asarray(batch.ts, dtype=np.int64),
        item_id=list(batch.item_id),
        category=list(batch.category),
        value=np.asarray(batch.value, dtype=np.float64),
        traits=list(batch.traits),
        properties=list(batch.properties),
    )


# --- splits ----------------------------------------------------------------------------


def holdout_last(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off each user's last item interaction, the test item of the evaluation protocol.

    "Last" is by frame order, which is replay order; only rows with an
    ``item_id`` count, so a later ``identify`` does not hide the last item.

    Returns:
        (everything else, one row per user with an item), both in frame order.
    """
    has_item = df["item_id"].notna().to_numpy()
    positions = np.flatnonzero(has_item)
    users = df["user_id"].to_numpy()[positions]
    # The last occurrence of each user among item rows: first occurrence in reverse.
    _, first_in_reverse = np.unique(users[::-1], return_index=True)
    test_positions = np.sort(positions[len(positions) - 1 - first_in_reverse])
    is_test = np.zeros(len(df), dtype=bool)
    is_test[test_positions] = True
    return (
        df.iloc[np.flatnonzero(~is_test)].reset_index(drop=True),
        df.iloc[test_positions].reset_index(drop=True),
    )


def split_by_time(df: pd.DataFrame, cutoff_ms: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Events before ``cutoff_ms``, and those at or after it, both in frame order."""
    before = df["ts"].to_numpy() < cutoff_ms
    return df[before].reset_index(drop=True), df[~before].reset_index(drop=True)


# --- internals -------------------------------------------------------------------------


def _frame(
    *,
    event_id: list[str],
    user_id: list[str],
    type: list[str],
    ts: np.ndarray,
    item_id: list[str | None],
    category: list[str | None],
    value: np.ndarray,
    traits: list[dict[str, Any] | None],
    properties: list[dict[str, Any] | None],
) -> pd.DataFrame:
    """A frame with the standard columns and dtypes (object strings, so missing is None)."""
    return pd.DataFrame(
        {
            "event_id": pd.Series(event_id, dtype=object),
            "user_id": pd.Series(user_id, dtype=object),
            "type": pd.Series(type, dtype=object),
            "ts": pd.Series(ts, dtype=np.int64),
            "item_id": pd.Series(item_id, dtype=object),
            "category": pd.Series(category, dtype=object),
            "value": pd.Series(value, dtype=np.float64),
            "traits": pd.Series(traits, dtype=object),
            "properties": pd.Series(properties, dtype=object),
        },
        columns=list(COLUMNS),
    )


def _must_exist(path: Path) -> None:
    if not path.exists():
        raise HistoryError(path, "no such file")
    if not path.is_file():
        raise HistoryError(path, "not a file")


def _read_csv(path: Path, required: Sequence[str], **options: Any) -> pd.DataFrame:
    """A CSV with its required columns, or a :class:`HistoryError` saying what is wrong."""
    _must_exist(path)
    try:
        header = pd.read_csv(path, nrows=0)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise HistoryError(path, f"not a readable CSV file: {exc}") from None
    missing = [c for c in required if c not in header.columns]
    if missing:
        raise HistoryError(
            path,
            f"missing column(s) {', '.join(missing)} (found: {', '.join(header.columns)})",
        )
    try:
        return pd.read_csv(path, **options)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise HistoryError(path, f"bad value: {exc}") from None


def _first_genres(movies: Path) -> dict[int, str | None]:
    """movieId -> its first genre; None for ``(no genres listed)``."""
    table = _read_csv(
        movies, MOVIES_COLUMNS, dtype={"movieId": "int64", "genres": str}, keep_default_na=False
    )
    first: dict[int, str | None] = {}
    for movie, genres in zip(table["movieId"].tolist(), table["genres"].tolist(), strict=True):
        name = genres.split("|", 1)[0].strip()
        first[movie] = None if not name or name == NO_GENRES else name
    return first


def _typed_column(cells: list[str]) -> list[str | int | float | None]:
    """One CSV column as numbers when every non-blank cell is one; blanks become None."""
    stripped = [c.strip() for c in cells]
    present = [c for c in stripped if c]
    numbers = pd.to_numeric(pd.Series(present, dtype=object), errors="coerce")
    if present and not numbers.isna().any():
        as_int = pd.api.types.is_integer_dtype(numbers.dtype)
        cast = int if as_int else float
        return [cast(c) if c else None for c in stripped]
    return [c if c else None for c in stripped]


def _optional(cells: list[Any]) -> list[Any]:
    """Missing markers (None, NaN, pandas NA) as None; everything else as it is."""
    return [None if _missing(c) else c for c in cells]


def _missing(cell: Any) -> bool:
    if cell is None or cell is pd.NA:
        return True
    return isinstance(cell, float) and math.isnan(cell)


def _json_lines(path: Path) -> tuple[list[bytes], list[int]]:
    """The non-blank lines of a JSON lines file as JSON records, and their line numbers.

    Integer timestamps are rewritten as RFC 3339, the only form the contract
    accepts; a line that is not a JSON object is an error naming the line.
    """
    records: list[bytes] = []
    numbers: list[int] = []
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                item = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise HistoryError(path, f"line {number}: invalid JSON ({exc})") from None
            if not isinstance(item, dict):
                raise HistoryError(path, f"line {number}: expected a JSON object")
            records.append(_with_iso_ts(item, text))
            numbers.append(number)
    return records, numbers


def _parquet_records(path: Path) -> list[bytes]:
    """The rows of a Parquet file as JSON records in the event shape."""
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise HistoryError(path, f"not a readable Parquet file: {exc}") from None
    if not len(table.columns):
        raise HistoryError(path, "the Parquet file has no columns")
    if "ts" in table.columns and pd.api.types.is_datetime64_any_dtype(table["ts"].dtype):
        if not isinstance(table["ts"].dtype, pd.DatetimeTZDtype):
            raise HistoryError(path, "column ts holds times without a timezone")
        table["ts"] = (table["ts"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    columns = list(table.columns)
    cells = [table[c].tolist() for c in columns]
    return [_with_iso_ts(_record(columns, row), None) for row in zip(*cells, strict=True)]


def _record(columns: Iterable[str], row: Iterable[Any]) -> dict[str, Any]:
    """One Parquet row as an event dict: missing cells dropped, maps made plain dicts."""
    out: dict[str, Any] = {}
    for name, cell in zip(columns, row, strict=True):
        if _missing(cell):
            continue
        if name in ("traits", "properties"):
            cell = _mapping(cell)
        elif isinstance(cell, np.generic):
            cell = cell.item()
        out[name] = cell
    return out


def _mapping(cell: Any) -> Any:
    """A traits/properties cell as a dict: Parquet maps read as pairs, structs as dicts.

    A struct column holds every key of every row, so keys that are None in a
    row were absent from it and are dropped; a JSON string is parsed.
    """
    if isinstance(cell, str):
        try:
            return orjson.loads(cell)
        except orjson.JSONDecodeError:
            return cell  # let the contract reject it
    if isinstance(cell, np.ndarray):
        cell = cell.tolist()
    if isinstance(cell, list) and all(isinstance(p, tuple) and len(p) == 2 for p in cell):
        return {str(k): _plain(v) for k, v in cell}
    if isinstance(cell, dict):
        return {str(k): _plain(v) for k, v in cell.items() if not _missing(v)}
    return cell


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _with_iso_ts(item: dict[str, Any], original: bytes | None) -> bytes:
    """The record as JSON, with an integer ``ts`` (epoch ms) written as RFC 3339."""
    ts = item.get("ts")
    if isinstance(ts, int) and not isinstance(ts, bool):
        # Out of any calendar: left as is, so the contract rejects it with its reason.
        with contextlib.suppress(OverflowError, ValueError):
            item["ts"] = _iso_ms(ts)
        return orjson.dumps(item)
    return original if original is not None else orjson.dumps(item)


def _iso_ms(ms: int) -> str:
    """RFC 3339 UTC with milliseconds, exact for any epoch-ms integer."""
    moment = _EPOCH + timedelta(milliseconds=ms)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"
