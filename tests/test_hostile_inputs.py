"""Hostile and damaged input files: each fault is a quarantine row with a reason, or one line.

Every test generates its files, ingests them through the library and checks the accounting
(rows read == pairs + quarantined, per source, against the catalog's own rows), then runs
`winnow ingest FILE -w TMP` through `flows.cli.main` and checks that it exits 0 or 2 with at
most one line on stderr and no traceback. Compressed inputs must give exactly the pairs of
the plain file.
"""

from __future__ import annotations

import builtins
import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import math
import os
import sys
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from curation.errors import WinnowError
from curation.ingest import IngestOptions, ingest
from curation.ingest.readers import read_json_array, read_jsonl
from curation.ingest.sources import Source
from curation.store import Catalog


def good(tag: str, n: int = 3, **extra) -> list[dict]:  # noqa: ANN003
    """Valid pairs, distinct per tag, so several files ingest together without duplicates."""
    return [{"prompt": f"{tag}: question {i}?", "chosen": f"{tag} right {i}", "rejected": f"{tag} wrong {i}", **extra}
            for i in range(n)]


def jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def json_array(items: list) -> str:
    return "[" + ", ".join(i if isinstance(i, str) else json.dumps(i) for i in items) + "]"


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write(folder: Path, files: dict[str, str | bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in files.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        paths.append(path)
    return paths


def cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `winnow ARGS` in this process; (exit code, stderr). Any exception but SystemExit fails the test."""
    from flows import cli as cli_module
    from flows.prefect_env import PREFECT_DEFAULTS

    for name, value in PREFECT_DEFAULTS.items():  # main() sets them; keep this process's environment as it was
        monkeypatch.setenv(name, os.environ.get(name, value))
    monkeypatch.setenv("WINNOW_NO_PROGRESS", "1")
    monkeypatch.setattr(sys, "argv", ["winnow", *args])
    capsys.readouterr()
    code = 0
    try:
        cli_module.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, capsys.readouterr().err


def assert_cli_clean(paths: list[Path], workdir: Path, monkeypatch, capsys, *flags: str) -> tuple[int, str]:  # noqa: ANN001
    """`winnow ingest PATHS -w WORKDIR`: exit 0, or 2 with one line; never a traceback."""
    code, err = cli(["ingest", *map(str, paths), "-w", str(workdir), *flags], monkeypatch, capsys)
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == (1 if code == 2 else 0), err
    return code, err


def check(tmp_path: Path, monkeypatch, capsys, *paths: Path, **options):  # noqa: ANN001, ANN201
    """Ingest `paths` together; assert the accounting per source, against the catalog; then the CLI on them."""
    catalog = Catalog(tmp_path / "ws")
    options.setdefault("max_bad_fraction", 1.0)
    result = ingest([str(p) for p in paths], catalog, IngestOptions(**options), progress=False)
    stored = dict(catalog.query("SELECT source, count(*) FROM pairs WHERE run_id = ? GROUP BY 1",
                                [result.run_id]).iter_rows())
    held = dict(catalog.query("SELECT source, count(*) FROM quarantine WHERE run_id = ? GROUP BY 1",
                              [result.run_id]).iter_rows())
    for row in result.accounting.to_dicts():
        assert row["rows_read"] == row["pairs"] + row["quarantined"], row
        assert (row["pairs"], row["quarantined"]) == (stored.get(row["source"], 0), held.get(row["source"], 0))
    assert_cli_clean(list(paths), tmp_path / "cli-ws", monkeypatch, capsys)
    return result, catalog


def check_one_line(tmp_path: Path, monkeypatch, capsys, path: Path, expected: str) -> None:  # noqa: ANN001
    """A file nothing can be read from: a WinnowError from the library, exit 2 and one line from the CLI."""
    with pytest.raises(WinnowError) as info:
        ingest([str(path)], Catalog(tmp_path / "ws"), IngestOptions(), progress=False)
    assert expected in str(info.value) and "\n" not in str(info.value)
    code, err = assert_cli_clean([path], tmp_path / "cli-ws", monkeypatch, capsys)
    assert code == 2 and expected in err, err


def per_file(catalog: Catalog, run_id: str) -> dict[str, tuple[int, dict[str, int]]]:
    """file name -> (pairs, {reason: rows})."""
    out: dict[str, tuple[int, dict[str, int]]] = {}
    for source, pairs in catalog.query("SELECT source, count(*) FROM pairs WHERE run_id = ? GROUP BY 1",
                                       [run_id]).iter_rows():
        out[Path(source).name] = (pairs, {})
    for source, reason, rows in catalog.query(
            "SELECT source, reason, count(*) FROM quarantine WHERE run_id = ? GROUP BY 1, 2", [run_id]).iter_rows():
        out.setdefault(Path(source).name, (0, {}))[1][reason] = rows
    return out


def pairs_of(catalog: Catalog, run_id: str, source: str) -> list[tuple]:
    return catalog.query("SELECT source_row, pair_id, prompt, chosen, rejected, score_chosen, score_rejected "
                         "FROM pairs WHERE run_id = ? AND source = ? ORDER BY source_row", [run_id, source]).rows()


# -- bytes and characters -----------------------------------------------------------------


def test_invalid_utf8_in_csv_and_json_array(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    bad_element = b'{"prompt": "q\xc3(", "chosen": "a", "rejected": "b"}'
    csv_rows = csv_text(good("csv", 2)).encode()
    paths = write(tmp_path / "in", {
        "bad.csv": csv_rows + b"q2,\xff\xfe broken,c2\n",
        "bad.json": b"[" + b", ".join([json.dumps(r).encode() for r in good("json", 1)] + [bad_element]
                                      + [json.dumps(r).encode() for r in good("json2", 1)]) + b"]",
    })
    result, catalog = check(tmp_path, monkeypatch, capsys, *paths)
    assert per_file(catalog, result.run_id) == {"bad.csv": (2, {"undecodable_bytes": 1}),
                                                 "bad.json": (2, {"undecodable_bytes": 1})}
    previews = catalog.query("SELECT raw FROM quarantine").to_series().to_list()
    assert all("\ufffd" in raw for raw in previews)  # the bad bytes show as replacement characters
    header = write(tmp_path / "header", {"header.csv": b"prompt,chos\xffen,rejected\nq1,a,b\n"})[0]
    check_one_line(tmp_path / "header", monkeypatch, capsys, header, "invalid UTF-8 in the CSV header")


def test_lone_surrogate_escapes(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """`\\ud800` decodes to a lone surrogate that no UTF-8 encoder takes; an escaped pair (an emoji) is fine."""
    lone = '{"prompt": "half a pair \\ud800 here", "chosen": "a", "rejected": "b"}'
    low = '{"prompt": "q", "chosen": "\\udc00", "rejected": "b"}'
    emoji = '{"prompt": "smile \\ud83d\\ude00", "chosen": "yes", "rejected": "no"}'
    messages = '[{"role": "assistant", "content": "\\ud800"}]'  # JSON text in a CSV cell, as exports hold it
    buffer = io.StringIO()
    csv.writer(buffer).writerows([["prompt", "chosen", "rejected"], ["q", messages, messages.replace("ud800", "u00e9")],
                                  ["csv q2", "a", "b"], ["csv q3", "c", "d"]])
    paths = write(tmp_path / "in", {"s.jsonl": jsonl([*good("jsonl", 1), lone, low, emoji]),
                                    "s.json": json_array([*good("json", 2), lone, low]),
                                    "s.csv": buffer.getvalue()})
    result, catalog = check(tmp_path, monkeypatch, capsys, *paths)
    assert per_file(catalog, result.run_id) == {"s.jsonl": (2, {"undecodable_bytes": 2}),
                                                 "s.json": (2, {"undecodable_bytes": 2}),
                                                 "s.csv": (2, {"undecodable_bytes": 1})}
    assert "smile \U0001f600" in catalog.query("SELECT prompt FROM pairs").to_series().to_list()


def test_byte_order_mark_is_stripped(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    bom = "\ufeff"
    paths = write(tmp_path / "in", {"b.jsonl": bom + jsonl(good("jsonl")), "b.json": bom + json_array(good("json")),
                                    "b.csv": bom + csv_text(good("csv"))})
    result, catalog = check(tmp_path, monkeypatch, capsys, *paths)
    assert per_file(catalog, result.run_id) == {name: (3, {}) for name in ("b.jsonl", "b.json", "b.csv")}
    prompts = catalog.query("SELECT prompt FROM pairs WHERE source_row <= 2").to_series().to_list()
    assert not any(p.startswith(bom) for p in prompts)


# -- numbers and nesting ------------------------------------------------------------------


def test_deep_nesting(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    deep = '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + ', "chosen": "a", "rejected": "b"}'
    paths = write(tmp_path / "in", {"d.jsonl": jsonl([*good("jsonl", 1), deep, *good("jsonl2", 1)]),
                                    "d.json": json_array([*good("json", 1), deep, *good("json2", 1)])})
    result, catalog = check(tmp_path, monkeypatch, capsys, *paths)
    assert per_file(catalog, result.run_id) == {"d.jsonl": (2, {"malformed_json": 1}),
                                                 "d.json": (2, {"malformed_json": 1})}
    assert set(catalog.query("SELECT detail FROM quarantine").to_series().str.contains("nested too deeply")) == {True}


def test_absurd_and_non_finite_numbers(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """1e400 (inf), NaN and Infinity literals and a 5000-digit integer never become a score."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def row(tag: str, i: int, value: str) -> str:
        return (f'{{"prompt": "{tag} p{i}", "chosen": "c{i}", "rejected": "r{i}", "score_chosen": {value}, '
                f'"score_rejected": 1}}')

    values = ["1e400", "NaN", "-Infinity", "9" * 5000]
    paths = write(tmp_path / "in", {
        "n.jsonl": jsonl([*good("jsonl", 2, score_chosen=8.5, score_rejected=2)]
                         + [row("jsonl", i, v) for i, v in enumerate(values)]),
        "n.json": json_array([*good("json", 2, score_chosen=8.5, score_rejected=2)]
                             + [row("json", i, v) for i, v in enumerate(values)]),
        "n.csv": csv_text(good("csv", 2, score_chosen=8.5, score_rejected=2)
                          + [dict(good(f"csv {v[:4]}", 1)[0], score_chosen=v, score_rejected=1)
                             for v in ["1e400", "nan", "-inf", "9" * 5000]]),
    })
    parquet = tmp_path / "in" / "n.parquet"
    pq.write_table(pa.Table.from_pylist(good("parquet", 2, score_chosen=8.5, score_rejected=2.0)
                                        + [dict(good("pq nan", 1)[0], score_chosen=float("nan"), score_rejected=1.0),
                                           dict(good("pq inf", 1)[0], score_chosen=1.0, score_rejected=float("inf"))]),
                   parquet)
    result, catalog = check(tmp_path, monkeypatch, capsys, *paths, parquet)
    assert per_file(catalog, result.run_id) == {
        "n.jsonl": (2, {"wrong_type": 2, "malformed_json": 2}),
        "n.json": (2, {"wrong_type": 2, "malformed_json": 2}),
        "n.csv": (2, {"wrong_type": 4}),
        "n.parquet": (2, {"wrong_type": 2}),
    }
    scores = catalog.query("SELECT score_chosen, score_rejected FROM pairs").rows()
    assert len(scores) == 8 and all(math.isfinite(v) for pair in scores for v in pair)


# -- damaged and unreadable files ----------------------------------------------------------


def _damaged_parquet(path: Path) -> Path:
    """Three row groups of 100 rows; the page header of the second group's first column overwritten."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"prompt {i} " * 5, "chosen": f"chosen {i} " * 8, "rejected": f"rejected {i} " * 8}
            for i in range(300)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100)
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 24] = b"\xff" * 24
    path.write_bytes(bytes(data))
    return path


def test_corrupt_parquet_row_group(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """The damaged row group's 100 rows are quarantined; the groups before and after it are read."""
    path = _damaged_parquet(tmp_path / "damaged.parquet")
    result, catalog = check(tmp_path, monkeypatch, capsys, path)
    assert per_file(catalog, result.run_id) == {"damaged.parquet": (200, {"undecodable_bytes": 100})}
    assert catalog.query("SELECT min(source_row), max(source_row) FROM quarantine").row(0) == (101, 200)
    assert "row group 1" in catalog.query("SELECT any_value(detail) FROM quarantine").item()


def test_unreadable_file_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """Permissions (simulated as well, since root reads everything): one line, no traceback."""
    path = write(tmp_path / "in", {"locked.jsonl": jsonl(good("locked"))})[0]
    path.chmod(0)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    check_one_line(tmp_path, monkeypatch, capsys, path, "Permission denied")


def test_truncated_and_mislabelled_compressed_files(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """A truncated stream keeps the rows before the cut and adds one row saying so; a lie in the name is one line."""
    import zstandard

    text = jsonl(good("cut", 1800)).encode()
    whole = gzip.compress(text)
    paths = write(tmp_path / "in", {"cut.jsonl.gz": whole[: len(whole) * 2 // 3],
                                    "cut.jsonl.zst": zstandard.ZstdCompressor().compress(text)[:-50]})
    result, catalog = check(tmp_path, monkeypatch, capsys, *paths)
    for name, (pairs, found) in per_file(catalog, result.run_id).items():
        assert pairs > 200 and found.get("undecodable_bytes") == 1, name
    details = catalog.query("SELECT detail FROM quarantine WHERE reason = 'undecodable_bytes'").to_series()
    assert set(details.str.contains("cannot be read past line")) == {True}
    plain = write(tmp_path / "plain", {"plain.jsonl.gz": jsonl(good("plain"))})[0]
    check_one_line(tmp_path / "plain", monkeypatch, capsys, plain, "not a gzip file")
    parquet = write(tmp_path / "pq", {"p.parquet.gz": gzip.compress(b"PAR1")})[0]
    check_one_line(tmp_path / "pq", monkeypatch, capsys, parquet, "compressed Parquet is not supported")


# -- JSON arrays ----------------------------------------------------------------------------


def test_huge_element_is_streamed_past_and_counted(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """A 50 MB element: one too_large row, the 5 rows after it still read, and never held in memory."""
    huge = '{"prompt": "big", "chosen": "' + "x" * (50 << 20) + '", "rejected": "y"}'
    paths = write(tmp_path / "in", {"huge.json": json_array([*good("json", 1), huge, *good("json2", 5)]),
                                    "huge.jsonl": jsonl([*good("jsonl", 1), huge, *good("jsonl2", 5)])})
    del huge
    for path, reader in zip(paths, (read_json_array, read_jsonl), strict=True):
        tracemalloc.start()
        records = sum(len(b.records) for b in reader(Source(path.suffix[1:], str(path)), 1000, 200_000))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert records == 6 and peak < 10 << 20, (path.name, peak)  # a fifth of the element: streamed past
    result, catalog = check(tmp_path, monkeypatch, capsys, *paths)
    assert per_file(catalog, result.run_id) == {"huge.json": (6, {"too_large": 1}), "huge.jsonl": (6, {"too_large": 1})}
    details = catalog.query("SELECT source_row, detail FROM quarantine ORDER BY source").rows()
    size = (50 << 20) + len('{"prompt": "big", "chosen": "", "rejected": "y"}')
    assert details == [(2, f"element 2: element of {size} bytes exceeds max_bytes=200000"),
                       (2, f"line of {size + 1} bytes exceeds max_bytes=200000")]


def test_json_array_syntax_faults_are_rows(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """Trailing garbage, a malformed element, a missing or doubled comma, a missing bracket: rows, not silence."""

    def items(tag: str) -> list[str]:
        return [json.dumps(r) for r in good(tag, 4)]

    a, b, c, d, e = (items(t) for t in "abcde")
    paths = write(tmp_path / "in", {
        "trailing.json": json_array(a[:3]) + ' {"prompt": "hidden"} garbage',
        "malformed.json": json_array([b[0], '{"prompt": "x", "chosen": }', b[1], b[2]]),
        "no_comma.json": "[" + c[0] + ", " + c[1] + " " + c[2] + ", " + c[3] + "]",
        "two_commas.json": "[" + d[0] + ",, " + d[1] + ", " + d[2] + "]",
        "unclosed.json": "[" + ", ".join(e[:3]),
    })
    result, catalog = check(tmp_path, monkeypatch, capsys, *paths)
    assert per_file(catalog, result.run_id) == {p.name: (3, {"malformed_json": 1}) for p in paths}


# -- CSV headers, options, folders ------------------------------------------------------------


def test_duplicate_csv_header_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    path = write(tmp_path / "in", {"dup.csv": "prompt,chosen,rejected,chosen\nq1,a,b,c\nq2,d,e,f\n"})[0]
    check_one_line(tmp_path, monkeypatch, capsys, path, "repeats column(s) 'chosen'")


@pytest.mark.parametrize(
    "options, flags",
    [
        ({"max_bad_fraction": float("nan")}, ["--max-bad-fraction", "nan"]),
        ({"max_bad_fraction": 1.5}, ["--max-bad-fraction", "1.5"]),
        ({"max_bad_fraction": -0.1}, ["--max-bad-fraction", "-0.1"]),
        ({"max_bytes": -5}, ["--max-bytes", "-5"]),
        ({"max_bytes": 0}, ["--max-bytes", "0"]),
        ({"batch_size": 0}, None),
    ],
)
def test_numeric_options_are_validated(tmp_path: Path, monkeypatch, capsys, options, flags) -> None:  # noqa: ANN001
    with pytest.raises(WinnowError) as info:
        IngestOptions(**options)
    assert next(iter(options)) in str(info.value) and "\n" not in str(info.value)
    if flags:
        path = write(tmp_path / "in", {"ok.jsonl": jsonl(good("ok"))})[0]
        code, err = assert_cli_clean([path], tmp_path / "cli-ws", monkeypatch, capsys, *flags)
        assert code == 2 and "must be" in err
        assert not (tmp_path / "cli-ws").exists()  # refused before anything was written
    assert IngestOptions(max_bad_fraction=0.0, max_bytes=1, batch_size=1).max_bytes == 1  # the bounds themselves pass


@pytest.mark.timeout(30)
def test_symlink_loops_and_links_read_each_file_once(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """Two links back up the tree (glob.glob looped on one and never finished with two), a link to a
    file and a link to a folder elsewhere: every file is read once, loops are not followed."""
    data, other = tmp_path / "tree" / "data", tmp_path / "tree" / "other"
    write(data / "sub", {"b.jsonl": jsonl(good("b", 1))})
    write(data, {"a.jsonl": jsonl(good("a", 3))})
    write(other, {"c.jsonl": jsonl(good("c", 2))})
    (data / "sub" / "up").symlink_to("..")
    (data / "sub" / "up2").symlink_to("../..")
    (data / "alias.jsonl").symlink_to("a.jsonl")
    (data / "elsewhere").symlink_to(other)
    expected = {str(data / "a.jsonl"): 3, str(data / "sub" / "b.jsonl"): 1, str(data / "elsewhere" / "c.jsonl"): 2}
    result, _ = check(tmp_path / "glob", monkeypatch, capsys, data / "**" / "*.jsonl")
    assert dict(zip(result.accounting["source"], result.accounting["rows_read"], strict=True)) == expected
    result, _ = check(tmp_path / "all", monkeypatch, capsys, data, data / "**" / "*.jsonl", data / "alias.jsonl")
    assert dict(zip(result.accounting["source"], result.accounting["rows_read"], strict=True)) == expected
    assert (result.pairs, result.quarantined) == (6, 0)  # no file twice, so no duplicates


# -- compressed inputs ----------------------------------------------------------------------

COMPRESSORS = {
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": lambda data: __import__("zstandard").ZstdCompressor().compress(data),
}


@pytest.fixture(scope="module")
def plain_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Catalog, str]:
    """JSONL, JSON and CSV files of scored pairs (and a broken line), ingested once as the reference."""
    folder = tmp_path_factory.mktemp("plain")
    texts = {}
    for kind in ("jsonl", "json", "csv"):
        rows = [dict(r, score_chosen=i % 5 + 0.5, score_rejected=0.25) for i, r in enumerate(good(kind, 200))]
        texts[f"pairs.{kind}"] = {"jsonl": jsonl([*rows[:7], "{broken", *rows[7:]]),
                                  "json": json.dumps(rows, indent=1), "csv": csv_text(rows)}[kind]
    paths = dict(zip(("jsonl", "json", "csv"), write(folder, texts), strict=True))
    catalog = Catalog(folder / "ws")
    run_id = ingest([str(p) for p in paths.values()], catalog, IngestOptions(), progress=False).run_id
    return paths, catalog, run_id


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_compressed_inputs_give_the_pairs_of_the_plain_file(  # noqa: ANN001
    tmp_path: Path, monkeypatch, capsys, suffix: str, plain_sources
) -> None:
    plain, plain_catalog, plain_run = plain_sources
    packed = {kind: write(tmp_path / "packed", {path.name + suffix: COMPRESSORS[suffix](path.read_bytes())})[0]
              for kind, path in plain.items()}
    result, catalog = check(tmp_path, monkeypatch, capsys, tmp_path / "packed")  # found by suffix in a folder
    for kind, path in packed.items():
        assert pairs_of(catalog, result.run_id, str(path)) == pairs_of(plain_catalog, plain_run, str(plain[kind]))
        assert len(pairs_of(catalog, result.run_id, str(path))) == 200
        assert Source(kind, str(path)).fingerprint() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert per_file(catalog, result.run_id)[f"pairs.jsonl{suffix}"] == (200, {"malformed_json": 1})
    assert {Path(k).name: v for k, v in result.layouts.items()} == {
        f"pairs.{kind}{suffix}": "explicit+scored" for kind in plain}


def test_compressed_reader_memory_is_flat_in_file_size(tmp_path: Path) -> None:
    """Decompressing streams: peak Python memory barely moves from 2.5k to 20k lines, as for plain files."""
    line = json.dumps({"prompt": "p" * 200, "chosen": "c" * 300, "rejected": "r" * 300}) + "\n"

    def peak(n: int) -> int:
        path = tmp_path / f"{n}.jsonl.gz"
        path.write_bytes(gzip.compress((line * n).encode(), compresslevel=1))
        tracemalloc.start()
        for _ in read_jsonl(Source("jsonl", str(path)), batch_size=500, max_bytes=10_000):
            pass
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak_bytes

    small, large = peak(2_500), peak(20_000)
    assert large < 1.3 * small, (small, large)


# -- the JSON array scanner, at every chunk boundary ----------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from('ab ,[]{}":\\\n\té€😀'), max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@pytest.mark.parametrize("chunk", range(1, 10))
def test_numbers_cut_at_a_chunk_boundary_are_read_whole(tmp_path: Path, monkeypatch, chunk: int) -> None:  # noqa: ANN001
    """json stops a number where its pattern does ("-0" of "-0.0", "2" of "2e10"): the reader must read on."""
    from curation.ingest import json_array

    monkeypatch.setattr(json_array, "_CHUNK", chunk)
    items = [[None], -0.0, 1.5, 2e10, 3e-2, -12, {"prompt": "p", "chosen": "c", "rejected": "r", "score": 0.25}]
    path = write(tmp_path, {"a.json": json.dumps(items)})[0]
    batches = list(read_json_array(Source("json", str(path)), 4, 10**6))
    rejects = [r for b in batches for r in b.rejects]
    assert [r["detail"] for r in rejects] == ["expected a JSON object, got list"] + [
        f"expected a JSON object, got {kind}" for kind in ("float", "float", "float", "float", "int")]
    assert [r for b in batches for r in b.records] == [(7, items[-1])]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(json_values, max_size=8), chunk=st.integers(1, 9), indent=st.sampled_from([None, 1]),
       cut=st.integers(0, 10**6), junk=st.sampled_from(["", ",", "]", "}", '"', "x", "\\"]))
@example(items=[[None], -0.0], chunk=3, indent=None, cut=0, junk="")  # "-0" + ".0": a number cut at a chunk
def test_json_array_reader_matches_json_and_never_crashes(tmp_path: Path, monkeypatch, items, chunk, indent, cut,
                                                          junk) -> None:  # noqa: ANN001
    """Any array, read through chunks of 1-9 characters: exactly json's elements; cut or spliced, rows and no crash."""
    from curation.ingest import json_array

    monkeypatch.setattr(json_array, "_CHUNK", chunk)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    text = json.dumps(items, indent=indent, ensure_ascii=bool(cut % 2))
    path = write(folder, {"a.json": "\ufeff" + text})[0]
    rows = [r for b in read_json_array(Source("json", str(path)), 4, 10**6) for r in (*b.records, *b.rejects)]
    records = [r for b in read_json_array(Source("json", str(path)), 4, 10**6) for r in b.records]
    assert records == [(i, v) for i, v in enumerate(items, start=1) if isinstance(v, dict)]
    assert len(rows) == len(items)
    broken = text[: cut % (len(text) + 1)] + junk + text[cut % (len(text) + 1):]
    path.write_text(broken, encoding="utf-8")
    try:
        batches = list(read_json_array(Source("json", str(path)), 4, 10**6))
    except WinnowError:
        return  # not an array at all: one line
    indexes = [r["source_row"] for b in batches for r in b.rejects] + [i for b in batches for i, _ in b.records]
    assert len(set(indexes)) == len(indexes) and all(i >= 1 for i in indexes)


def test_non_finite_scores_written_as_text_are_quarantined(tmp_path: Path) -> None:
    """A score of "1e400" or "nan" as text (CSV cells, JSON strings, hub rows) never becomes a rating."""
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b", "score_chosen": value, "score_rejected": 1.0}
            for i, value in enumerate(["1e400", "nan", "-inf", "2.5"])]
    path = tmp_path / "scores.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    catalog = Catalog(tmp_path / "ws")
    result = ingest([str(path)], catalog, IngestOptions(max_bad_fraction=1.0), progress=False)
    assert result.pairs == 1 and result.quarantined == 3
    reasons = catalog.query("SELECT source_row, reason, detail FROM quarantine ORDER BY source_row")
    assert reasons["reason"].to_list() == ["wrong_type"] * 3 and reasons["source_row"].to_list() == [1, 2, 3]
    assert all("finite" in d for d in reasons["detail"].to_list())
