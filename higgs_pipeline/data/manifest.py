"""Reading a speech manifest (CSV, JSONL or Parquet; local or s3://) into a table of strings, one row per record.

Two kinds of failure are kept apart on purpose:
- the manifest cannot be read at all (missing, unknown format, unparsable, a required column missing): that is
  a `ManifestError` naming the file and the problem, and the asset fails;
- one record is bad (a CSV line with the wrong number of fields, a JSONL line that is not a JSON object, a
  manifest field holding a JSON object or array, text that is not valid UTF-8): that record is kept with its
  problem noted and rejected later, the rest flows.

Every value stays a Python `str`: "NA", "null" or "" are text, never NaN (pandas' NA guessing is off), and
bytes that are not valid UTF-8 are kept as lone surrogates (`surrogateescape`) so the one bad row can be found
and reported while its neighbours decode normally.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache, partial

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from higgs_pipeline.data.memory import release_unused_memory

REQUIRED_COLUMNS = ("audio_path", "text", "speaker")
# `asr_model` and `asr_confidence` say which ASR wrote `text` and how sure it was (ingest's clip manifest): a
# transcript_check with the same model reuses that transcript instead of transcribing the clip again.
OPTIONAL_COLUMNS = (
    "id",
    "language",
    "scene",
    "ref_audio_path",
    "ref_text",
    "dialogue_id",
    "turn",
    "asr_model",
    "asr_confidence",
)
MANIFEST_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# Lone surrogates U+DC80..U+DCFF are what `surrogateescape` makes of bytes that are not UTF-8.
INVALID_UTF8 = "[\udc80-\udcff]"
LOCAL = "file"
# Records turned into Python objects at a time while reading: a chunk's objects are freed before the next is read.
CHUNK_ROWS = 100_000
# csv's default cap of 131,072 characters per field would fail a manifest pandas reads fine (a long transcript).
csv.field_size_limit(2**31 - 1)


class ManifestError(ValueError):
    """The manifest as a whole cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Manifest:
    """A manifest read into memory.

    `rows` has every MANIFEST_COLUMNS column as str, plus `row` (1-based record number, the number users see in
    reject reports), `read_error` ("" or why the record itself could not be parsed) and `invalid_utf8` (the
    columns of that row that held bytes which are not UTF-8, shown as U+FFFD). `raw` is the file's bytes
    (hashed into the data version).
    """

    uri: str
    rows: pd.DataFrame
    raw: bytes


Conform = Callable[[pd.DataFrame], pd.DataFrame]


def manifest_format(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    extension = os.path.splitext(name)[1]
    if extension not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise ManifestError(f"manifest {uri}: unknown format '{extension or name}': use one of {known}")
    return FORMATS[extension]


def absolute_uri(uri: str) -> str:
    """Local paths made absolute (relative manifest paths are relative to the working directory)."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return os.path.abspath(uri.removeprefix("file://"))


def read_manifest(uri: str) -> Manifest:
    """Read a manifest; raises ManifestError when the file as a whole cannot be used."""
    uri = absolute_uri(uri)
    kind = manifest_format(uri)
    try:
        with fsspec.open(uri, "rb", compression="infer") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise ManifestError(f"manifest {uri}: file not found") from None
    except (OSError, EOFError, ValueError) as error:
        raise ManifestError(f"manifest {uri}: cannot read it: {error}") from error
    if not raw or raw.isspace():  # `strip` would copy the file
        raise ManifestError(f"manifest {uri}: the file is empty (expected a header with {', '.join(REQUIRED_COLUMNS)})")
    if kind != "parquet" and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ManifestError(
            f"manifest {uri}: the file is UTF-16 encoded (as Excel's 'Unicode text' saves): save it as UTF-8"
        )
    readers = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}
    # Scanning values for undecodable bytes is only needed when the file is not valid UTF-8 as a whole.
    # A CSV or Parquet file states its columns even when every record is bad; JSONL only has its records' keys.
    conform = partial(_conform, check_utf8=kind == "parquet" or not _is_utf8(raw), columns_known=kind != "jsonl")
    try:
        rows = readers[kind](raw, conform)
    except ManifestError as error:
        raise ManifestError(f"manifest {uri}: {error}") from None
    except Exception as error:  # any parser's own error means the file as a whole is unusable
        raise ManifestError(f"manifest {uri}: cannot parse it as {kind}: {type(error).__name__}: {error}") from error
    release_unused_memory()  # the chunks' conversions
    return Manifest(uri, rows, raw)


def _is_utf8(raw: bytes, block: int = 2**20) -> bool:
    """Decoded a block at a time: the whole file as one string would be a second copy of it."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(raw)
    try:
        for start in range(0, len(raw), block):
            decoder.decode(view[start : start + block])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _read_csv(raw: bytes, conform: Conform) -> pd.DataFrame:
    # pandas' C parser stops at a record with too many fields but pads one with too few, which would then be
    # rejected for an "empty" field it never had: count every record's fields first (csv's C reader, one pass)
    # and read record by record, keeping the bad ones as rows of their own with their line number, if any is off.
    records = (fields for fields in csv.reader(_text(raw)) if not _is_blank(fields))
    header = _check_header(next(records, []))
    if any(len(fields) != len(header) for fields in records):
        return conform(_read_csv_records(raw))
    options = dict(
        dtype=object, keep_default_na=False, na_filter=False, encoding="utf-8-sig", encoding_errors="surrogateescape"
    )
    try:
        chunks = pd.read_csv(io.BytesIO(raw), chunksize=CHUNK_ROWS, **options)
        return _concat_rows([conform(chunk.assign(read_error="")) for chunk in chunks])
    except pd.errors.ParserError:
        return conform(_read_csv_records(raw))


def _text(raw: bytes) -> io.TextIOWrapper:
    """The file's text, decoded as it is read: a StringIO of the whole file would hold 4 bytes a character."""
    return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig", errors="surrogateescape", newline="")


def _concat_rows(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Chunks conformed one by one as one table, `row` numbered across them (Arrow strings concatenate as chunks,
    without a copy)."""
    if len(parts) == 1:
        return parts[0]
    rows = pd.concat(parts, ignore_index=True)
    rows["row"] = np.arange(1, len(rows) + 1, dtype=np.int64)
    return rows


def _is_blank(fields: list[str]) -> bool:
    """An empty or whitespace-only line, which pandas skips too (a line of bare commas is a record)."""
    return len(fields) <= 1 and not "".join(fields).strip()


def _check_header(header: list[str]) -> list[str]:
    names = [name.strip() for name in header]
    # Unnamed columns (a spreadsheet's trailing empty cells, ",," in the header) are ignored, not repeats.
    repeated = sorted({name for name in names if name and names.count(name) > 1})
    if repeated:
        raise ManifestError(f"the header repeats column(s) {', '.join(repeated)}: each column must appear once")
    return header


def _read_csv_records(raw: bytes) -> pd.DataFrame:
    reader = csv.reader(_text(raw))
    header = _check_header(next((fields for fields in reader if not _is_blank(fields)), []))
    records, errors = [], []
    for fields in reader:
        if _is_blank(fields):
            continue
        if len(fields) == len(header):
            records.append(fields)
            errors.append("")
        else:
            padded = (fields + [""] * len(header))[: len(header)]
            records.append(padded)
            errors.append(f"line {reader.line_num}: {len(fields)} fields, the header has {len(header)}")
    table = pd.DataFrame(records, columns=header, dtype=object)
    table["read_error"] = errors
    return table


def _read_jsonl(raw: bytes, conform: Conform) -> pd.DataFrame:
    records, errors = [], []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        text = line.decode("utf-8-sig" if number == 1 else "utf-8", "surrogateescape")
        try:
            value = json.loads(text)
            error = "" if isinstance(value, dict) else f"line {number}: a JSON {type(value).__name__}, not an object"
        except json.JSONDecodeError as bad:
            value, error = {}, f"line {number}: not valid JSON ({bad.msg} at column {bad.colno})"
        error = error or _nested_fields(value, f"line {number}")
        records.append(value if not error else {})
        errors.append(error)
    # Built column by column as objects: pandas would otherwise infer Arrow strings, which reject the lone
    # surrogates that mark undecodable bytes.
    keys = dict.fromkeys(key for record in records for key in record)
    table = pd.DataFrame(
        {key: pd.Series([_as_text(r.get(key)) for r in records], dtype=object) for key in keys},
        index=pd.RangeIndex(len(records)),
    )
    table["read_error"] = errors
    return conform(table)


def _read_parquet(raw: bytes, conform: Conform) -> pd.DataFrame:
    table = pq.read_table(io.BytesIO(raw))
    nested = [
        name
        for name in table.column_names
        if _column_name(name) in MANIFEST_COLUMNS and pa.types.is_nested(table.schema.field(name).type)
    ]
    # Conformed a batch of records at a time: their values as Python objects are what costs memory.
    batches = table.to_batches(max_chunksize=CHUNK_ROWS) or [table]
    return _concat_rows([conform(_parquet_records(batch, nested, first)) for batch, first in _numbered(batches)])


def _numbered(batches: list) -> Iterator[tuple[object, int]]:
    """Each batch with the record number of its first record."""
    first = 1
    for batch in batches:
        yield batch, first
        first += batch.num_rows


def _parquet_records(batch: pa.RecordBatch | pa.Table, nested: list[str], first: int) -> pd.DataFrame:
    # Parquet strings are UTF-8 by construction; binary columns may not be, and numbers become text. Values come
    # from Arrow as Python objects, not through pandas: an integer column with a null would become float64
    # there, and speaker 7 would turn into the label "7.0" (another speaker than the CSV manifest's "7").
    values = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.column_names)}
    columns = {name: pd.Series([_as_text(v) for v in column], dtype=object) for name, column in values.items()}
    errors = [
        _nested_fields({name: values[name][i] for name in nested}, f"record {first + i}") for i in range(batch.num_rows)
    ]
    return pd.DataFrame(columns, index=pd.RangeIndex(batch.num_rows)).assign(read_error=errors if nested else "")


def _nested_fields(record: dict, where: str) -> str:
    """ "" or why the record is malformed: a manifest field holding a JSON object or array (a list of speakers, a
    {"text": ...} wrapper) has no single text value, and its JSON spelling would be trained on as the transcript."""
    nested = [
        key for key, value in record.items() if isinstance(value, dict | list) and _column_name(key) in MANIFEST_COLUMNS
    ]
    if not nested:
        return ""
    kinds = ", ".join(f"{key} holds a JSON {'object' if isinstance(record[key], dict) else 'array'}" for key in nested)
    return f"{where}: {kinds}, not a text value"


def _as_text(value: object) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # JSON's spelling, not Python's "True"
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        # A whole number stored as float (a JSON 7.0, a Parquet int column with a null) reads as the CSV's "7".
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _conform(table: pd.DataFrame, check_utf8: bool, columns_known: bool = True) -> pd.DataFrame:
    """The known columns as pandas strings, plus `row`, `read_error` and `invalid_utf8` (the bad columns' names).

    Column names match after stripping spaces and ignoring case ("Audio_Path" is audio_path); two columns that
    then mean the same one are an error. Invalid bytes are found while values are still Python objects, then
    shown as U+FFFD: from here on the columns are Arrow-backed strings (compact, vectorised string operations).
    """
    original = [str(name) for name in table.columns]
    names = [_column_name(name) for name in original]
    clashes = sorted({name for name in names if name in MANIFEST_COLUMNS and names.count(name) > 1})
    if clashes:
        spelled = {name: [o for o, n in zip(original, names, strict=True) if n == name] for name in clashes}
        raise ManifestError(
            "columns " + "; ".join(f"{' and '.join(map(repr, v))} both mean {k}" for k, v in spelled.items())
        )
    table = table.set_axis(names, axis=1)
    has_records = len(table) > 0 and (table["read_error"] == "").any()
    missing = [name for name in REQUIRED_COLUMNS if name not in table.columns]
    if missing and (columns_known or has_records or len(table) == 0):
        present = ", ".join(c for c in original if c != "read_error") or "none"
        raise ManifestError(f"missing required column(s) {', '.join(missing)} (columns found: {present})")
    size = len(table)
    rows = pd.DataFrame({"row": np.arange(1, size + 1, dtype=np.int64)})
    invalid = np.full(size, "", dtype=object)
    for name in MANIFEST_COLUMNS:
        if name not in table.columns:
            rows[name] = _blank_column(size)
            continue
        values = table[name].astype(object).reset_index(drop=True)
        if check_utf8:
            bad = values.str.contains(INVALID_UTF8, regex=True).to_numpy(bool)
            if bad.any():
                invalid[bad] = np.where(invalid[bad] == "", name, invalid[bad] + ", " + name)
                values[bad] = [_displayable(v) for v in values[bad]]
        rows[name] = values.astype("str")
    rows["read_error"] = _text_column(table["read_error"].to_numpy(object))
    rows["invalid_utf8"] = _text_column(invalid)
    return rows


def _text_column(values: np.ndarray) -> pd.Series:
    """Python strings as a pandas string column; all "" (the usual case of a note column) costs nothing a row."""
    return _blank_column(len(values)) if not (values != "").any() else pd.Series(values, dtype="str")


@cache
def _blank_chunk() -> pa.Array:
    return pa.array([""] * CHUNK_ROWS, pa.large_string())


def _blank_column(size: int) -> pd.Series:
    """`size` empty strings, every chunk of them the same Arrow buffer: a column the manifest does not have would
    otherwise cost 8 bytes a row (an Arrow string offset) for nothing."""
    chunk = _blank_chunk()
    parts = [chunk] * (size // len(chunk)) + [chunk.slice(0, size % len(chunk))]
    return pa.chunked_array(parts, pa.large_string()).to_pandas()


def _column_name(name: str) -> str:
    stripped = name.strip()
    return stripped.lower() if stripped.lower() in MANIFEST_COLUMNS else stripped


def _displayable(value: str) -> str:
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def manifest_folder(uri: str) -> tuple[str, str]:
    """(protocol, folder) of a manifest: audio paths are resolved against, and must stay inside, this folder."""
    protocol, path = split_uri(uri)
    return protocol, posixpath.dirname(path)


def split_uri(uri: str) -> tuple[str, str]:
    if "://" in uri:
        protocol, path = uri.split("://", 1)
        return (LOCAL, path) if protocol == LOCAL else (protocol, path)
    return LOCAL, uri


def join_uri(protocol: str, path: str) -> str:
    return path if protocol == LOCAL else f"{protocol}://{path}"


def resolve_audio_paths(manifest_uri: str, paths: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(resolved URI, outside-the-manifest-folder flag) for each audio path.

    Relative paths are joined to the manifest's folder; absolute paths and URIs are taken as they are. A path is
    "outside" when it is not under the manifest's folder on the same filesystem: that is how a manifest row cannot
    make the pipeline read /etc/passwd or another bucket unless the run allows it. Local paths compare as real
    paths (".." collapsed and symbolic links followed, the folder's own included), so a link inside the folder
    cannot lead out of it. Nothing is opened here, the flag is the same whether or not an outside target exists
    (realpath resolves what links it meets and keeps the rest as written), and an outside path keeps its lexical
    form: the result shows nothing of what lies outside. Computed once per distinct path, so a million rows over
    few files stay cheap.
    """
    protocol, folder = manifest_folder(manifest_uri)
    real_folder = _real_path(folder) if protocol == LOCAL else folder
    codes, distinct = pd.factorize(paths)
    real_folders: dict[str, str] = {}  # a million clips sit in a few thousand folders: resolve each folder once
    uris, outside = [], []
    for start in range(0, len(distinct), CHUNK_ROWS):  # only a chunk's paths as Python strings at a time
        part = distinct[start : start + CHUNK_ROWS]
        resolved = [_resolve(protocol, folder, real_folder, path, real_folders) for path in part]
        uris.append(pa.array([uri for uri, _ in resolved], pa.large_string()))
        outside.append(np.array([flag for _, flag in resolved], dtype=bool))
    flags = np.concatenate(outside) if outside else np.zeros(0, dtype=bool)
    resolved = pa.chunked_array(uris, pa.large_string())
    if len(distinct) < len(paths):  # else every path is new: codes are 0, 1, 2, ..., the chunks already in row order
        codes = np.where(codes < 0, len(distinct), codes)  # code -1 (none here) points at the "" appended
        resolved = pa.chunked_array([*uris, pa.array([""], pa.large_string())]).take(codes)
        flags = np.append(flags, False)[codes]
    return pd.Series(resolved.to_pandas().array, index=paths.index, copy=False), pd.Series(flags, index=paths.index)


def _resolve(protocol: str, folder: str, real_folder: str, path: str, real_folders: dict[str, str]) -> tuple[str, bool]:
    if not path:
        return "", False
    if "://" in path:
        path_protocol, target = split_uri(path)
    elif path.startswith("/"):
        path_protocol, target = LOCAL, path
    else:
        path_protocol, target = protocol, posixpath.join(folder, path)
    target = posixpath.normpath(target)
    if path_protocol != protocol:
        return join_uri(path_protocol, target), True
    if protocol == LOCAL:
        real = _real_file_path(target, real_folders)
        if _is_under(real, real_folder):
            return real, False
        return target, True
    return join_uri(path_protocol, target), not _is_under(target, folder)


def _real_file_path(path: str, real_folders: dict[str, str]) -> str:
    """`os.path.realpath` of a normalized path, its folder's real path memoized in `real_folders`: the same answer
    (a path whose last part is not a link is its real folder plus that part) for one lstat instead of one per
    folder level."""
    parent, leaf = posixpath.split(path)
    if leaf in ("", ".", ".."):
        return _real_path(path)
    if parent not in real_folders:
        real_folders[parent] = _real_path(parent)
    joined = posixpath.join(real_folders[parent], leaf)
    try:
        return _real_path(joined) if os.path.islink(joined) else joined
    except ValueError:  # a NUL character: no such file can exist, and opening it names the problem
        return path


def _real_path(path: str) -> str:
    try:
        return os.path.realpath(path)
    except ValueError:  # a NUL character: no such file can exist, and opening it names the problem
        return path


def _is_under(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")
