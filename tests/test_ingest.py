"""Ingestion: formats, file kinds, every reason code, one-line errors, accounting, idempotence."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curation.errors import MissingSourceError, NoValidPairsError, TooManyBadRowsError, UnknownFormatError
from curation.ingest import IngestOptions, ingest
from curation.ingest.readers import read_jsonl
from curation.ingest.sources import Source
from curation.schema import Format
from curation.store import Catalog

GOOD = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    {"prompt": "Sort: 3 1 2", "chosen": "1 2 3", "rejected": "3 2 1"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def run(tmp_path: Path, *sources: Path | str, **options) -> tuple:
    catalog = Catalog(tmp_path / "ws")
    result = ingest([str(s) for s in sources], catalog, IngestOptions(**options), progress=False)
    return result, catalog


def reasons(catalog: Catalog, run_id: str) -> dict[str, int]:
    frame = catalog.query("SELECT reason, count(*) AS n FROM quarantine WHERE run_id = ? GROUP BY 1", [run_id])
    return dict(frame.iter_rows())


# -- formats ----------------------------------------------------------------------------


def test_explicit_jsonl(tmp_path: Path) -> None:
    result, catalog = run(tmp_path, write_jsonl(tmp_path / "a.jsonl", GOOD))
    assert (result.pairs, result.quarantined) == (3, 0)
    assert result.layouts == {str(tmp_path / "a.jsonl"): "explicit"}
    pairs = catalog.query("SELECT prompt, chosen, rejected, source_row FROM pairs ORDER BY source_row")
    assert pairs.rows() == [(g["prompt"], g["chosen"], g["rejected"], i + 1) for i, g in enumerate(GOOD)]


def test_scored_format_detected_and_enforced(tmp_path: Path) -> None:
    rows = [{**g, "score_chosen": 8, "score_rejected": "2.5"} for g in GOOD]
    result, catalog = run(tmp_path, write_jsonl(tmp_path / "s.jsonl", rows))
    assert list(result.layouts.values()) == ["explicit+scored"]
    assert catalog.query("SELECT score_chosen, score_rejected FROM pairs").rows()[0] == (8.0, 2.5)
    # forcing --format scored on unscored rows quarantines them as missing_field
    with pytest.raises(NoValidPairsError):
        run(tmp_path, write_jsonl(tmp_path / "u.jsonl", GOOD), format=Format.SCORED)


def test_score_aliases_and_bad_scores(tmp_path: Path) -> None:
    rows = [{**GOOD[0], "chosen_rating": 5, "rejected_rating": 1}, {**GOOD[1], "chosen_rating": "high", "rejected_rating": 1},
            {**GOOD[2], "chosen_rating": True, "rejected_rating": 1}]
    result, catalog = run(tmp_path, write_jsonl(tmp_path / "r.jsonl", rows), max_bad_fraction=0.9)
    assert result.pairs == 1 and reasons(catalog, result.run_id) == {"wrong_type": 2}


def test_trl_conversational_explicit_and_implicit(tmp_path: Path) -> None:
    explicit = {
        "prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    implicit = {
        "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}],
    }
    result, catalog = run(tmp_path, write_jsonl(tmp_path / "c.jsonl", [explicit, implicit]))
    assert result.pairs == 2 and list(result.layouts.values()) == ["conversational"]
    rows = catalog.query("SELECT chosen, rejected, prompt_messages, chosen_messages FROM pairs ORDER BY source_row").rows()
    assert rows[0][0] == "Hello!" and rows[1][1] == "No."
    assert json.loads(rows[1][2]) == [{"role": "user", "content": "Hi?"}]
    assert json.loads(rows[1][3]) == [{"role": "assistant", "content": "Hello!"}]


def test_hh_implicit_prompt_split_single_and_multi_turn(tmp_path: Path) -> None:
    single = {
        "chosen": "\n\nHuman: What is up?\n\nAssistant: The sky.",
        "rejected": "\n\nHuman: What is up?\n\nAssistant: Nothing much, you?",
    }
    multi = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell a joke\n\nAssistant: Why did the chicken cross?",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell a joke\n\nAssistant: No.",
    }
    # shared text runs into the final answer ("The "): the split still sits after the marker
    shared_start = {
        "chosen": "\n\nHuman: Color?\n\nAssistant: The sky is blue.",
        "rejected": "\n\nHuman: Color?\n\nAssistant: The grass is green.",
    }
    no_marker = {"chosen": "Human: hi", "rejected": "Human: ho"}
    path = write_jsonl(tmp_path / "hh.jsonl", [single, multi, shared_start, no_marker])
    result, catalog = run(tmp_path, path)
    assert list(result.layouts.values()) == ["implicit"]
    rows = catalog.query("SELECT prompt, chosen, rejected FROM pairs ORDER BY source_row").rows()
    assert rows[0] == ("\n\nHuman: What is up?\n\nAssistant:", " The sky.", " Nothing much, you?")
    assert rows[1] == (
        "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell a joke\n\nAssistant:",
        " Why did the chicken cross?",
        " No.",
    )
    assert rows[2] == ("\n\nHuman: Color?\n\nAssistant:", " The sky is blue.", " The grass is green.")
    assert reasons(catalog, result.run_id) == {"no_shared_prompt": 1}


def test_format_override_beats_detection(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", GOOD)
    with pytest.raises(NoValidPairsError):  # read as implicit: no prompt marker in any row
        run(tmp_path, path, format=Format.IMPLICIT)


def test_unknown_format_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UnknownFormatError, match="cannot detect the format"):
        run(tmp_path, write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}]))


# -- file kinds, folders, globs -----------------------------------------------------------


def test_json_array_parquet_csv_folder_and_glob(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.json").write_text(json.dumps(GOOD), encoding="utf-8")
    pl.DataFrame(GOOD).with_columns(pl.col("chosen") + "!").write_parquet(data / "b.parquet")
    with open(data / "c.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        for g in GOOD:
            writer.writerow({**g, "chosen": g["chosen"] + "\nmulti-line"})
    (data / "notes.txt").write_text("ignored")
    result, catalog = run(tmp_path, data)
    assert result.pairs == 9 and result.quarantined == 0
    by_source = dict(catalog.query("SELECT source, count(*) FROM pairs GROUP BY 1").iter_rows())
    assert set(Path(s).suffix for s in by_source) == {".json", ".parquet", ".csv"}
    csv_rows = catalog.query("SELECT source_row FROM pairs WHERE source LIKE '%.csv' ORDER BY 1")["source_row"]
    assert csv_rows.to_list() == [2, 4, 6]  # records start on these lines (multi-line fields)
    glob_result, _ = run(tmp_path, str(data / "*.json*"))
    assert glob_result.pairs == 3


def test_json_array_streams_and_reports_elements(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    items = [dict(g, prompt=f"{g['prompt']} #{i}") for i in range(400) for g in GOOD]
    path.write_text("[\n" + ",\n".join(json.dumps(x) for x in items) + "\n]", encoding="utf-8")
    result, _ = run(tmp_path, path)
    assert result.pairs == 1200


def test_json_array_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(GOOD)[:-40], encoding="utf-8")
    result, catalog = run(tmp_path, path, max_bad_fraction=0.9)
    assert result.pairs == 2 and reasons(catalog, result.run_id) == {"malformed_json": 1}


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mislabelled.json", GOOD)
    assert run(tmp_path, path)[0].pairs == 3


def test_hub_source_unreachable_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from curation.errors import SourceUnavailableError

    with pytest.raises(SourceUnavailableError, match="cannot load dataset hf:someone/missing-set:train") as info:
        run(tmp_path, "hf:someone/missing-set")
    assert "\n" not in str(info.value)


def _cache_hub_dataset(cache: Path, repo_id: str, rows: list[dict]) -> None:
    """Lay out ``rows`` in a `datasets` cache as a prepared download of hub dataset ``repo_id`` would be."""
    import shutil

    from datasets.packaged_modules.json.json import Json

    name = repo_id.split("/")[-1]
    data = write_jsonl(cache.parent / f"{name}.jsonl", rows)
    builder = Json(cache_dir=str(cache.parent / "build"), dataset_name=name, data_files={"train": str(data)},
                   hash="0123abcd")
    builder.download_and_prepare()
    built = Path(builder.cache_dir)
    dest = cache / repo_id.replace("/", "___") / "default" / built.parent.name / built.name
    shutil.copytree(built, dest)
    info = json.loads((dest / "dataset_info.json").read_text())
    (dest / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default"}))


def test_hub_source_offline_reads_the_local_cache_without_flipping_offline_switches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, a cached hub dataset loads per call: no library's global offline switch is touched."""
    import datasets
    import huggingface_hub.constants as hub_constants
    from datasets.packaged_modules.cache.cache import Cache

    cache = tmp_path / "datasets-cache"
    _cache_hub_dataset(cache, "someone/tiny-prefs", GOOD)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # Winnow's knob says offline; the libraries' switches say online
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    before = (False, False)
    seen = []
    prepare = Cache.download_and_prepare

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append((hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE))
        return prepare(self, *args, **kwargs)

    def no_load_dataset(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("offline, the cache is read directly, not through load_dataset")

    monkeypatch.setattr(Cache, "download_and_prepare", spy)
    monkeypatch.setattr(datasets, "load_dataset", no_load_dataset)
    result, catalog = run(tmp_path, "hf:someone/tiny-prefs")
    assert result.pairs == 3
    assert sorted(catalog.query("SELECT prompt FROM pairs")["prompt"]) == sorted(g["prompt"] for g in GOOD)
    assert seen == [before], "the offline switches are the same during the load"
    assert (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before


# -- reason codes -------------------------------------------------------------------------


def test_every_reason_code(tmp_path: Path) -> None:
    lines = [
        json.dumps(GOOD[0]),  # kept
        '{"prompt": "x", "chosen": ',  # malformed_json
        json.dumps({"prompt": "p", "chosen": "c"}),  # missing_field
        json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"}),  # wrong_type
        json.dumps([1, 2]),  # wrong_type (not an object)
        json.dumps({"prompt": "p", "chosen": "  ", "rejected": "r"}),  # empty_text
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same "}),  # identical_sides (after trim)
        json.dumps({"prompt": "p", "chosen": "x" * 500, "rejected": "r"}),  # too_large
        json.dumps(GOOD[0]),  # duplicate
        json.dumps(GOOD[1]),  # contradiction (with the next line)
        json.dumps({**GOOD[1], "chosen": GOOD[1]["rejected"], "rejected": GOOD[1]["chosen"]}),
        json.dumps(GOOD[2]),  # kept
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n')
    result, catalog = run(tmp_path, path, max_bytes=400, max_bad_fraction=0.95)
    assert reasons(catalog, result.run_id) == {
        "malformed_json": 1,
        "missing_field": 1,
        "wrong_type": 2,
        "empty_text": 1,
        "identical_sides": 1,
        "too_large": 1,
        "duplicate": 1,
        "contradiction": 2,
        "undecodable_bytes": 1,
    }
    assert result.pairs == 2 and result.rows_read == 13
    rows = catalog.query("SELECT source_row, reason, detail FROM quarantine ORDER BY source_row").rows()
    assert rows[0][:2] == (2, "malformed_json") and rows[-1][:2] == (13, "undecodable_bytes")
    dup = [r for r in rows if r[1] == "duplicate"][0]
    assert dup[0] == 9 and dup[2].endswith(":1")  # points back at the first copy


def test_unicode_normalisation_makes_duplicates(tmp_path: Path) -> None:
    composed = {"prompt": "caf\u00e9", "chosen": "oui", "rejected": "non"}
    decomposed = {"prompt": "cafe\u0301", "chosen": "oui", "rejected": "non"}
    result, catalog = run(tmp_path, write_jsonl(tmp_path / "u.jsonl", [composed, decomposed]))
    assert result.pairs == 1 and reasons(catalog, result.run_id) == {"duplicate": 1}


def test_csv_malformed_row(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text('prompt,chosen,rejected\n"q","a","b"\n"q2","a2"\n"q3","a3","b3"\n', encoding="utf-8")
    result, catalog = run(tmp_path, path)
    assert result.pairs == 2 and reasons(catalog, result.run_id) == {"malformed_row": 1}


# -- errors and thresholds ----------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(MissingSourceError, match="no such file"):
        run(tmp_path, tmp_path / "nope.jsonl")


def test_bad_fraction_threshold(tmp_path: Path) -> None:
    rows = [GOOD[0], "{bad", "{bad", "{bad"]
    with pytest.raises(TooManyBadRowsError, match="75% of rows quarantined"):
        run(tmp_path, write_jsonl(tmp_path / "b.jsonl", rows))
    # the failed run keeps its quarantine for inspection but no pairs
    catalog = Catalog(tmp_path / "ws")
    assert catalog.query("SELECT status FROM runs").item() == "failed"
    assert catalog.query("SELECT count(*) FROM pairs").item() == 0
    assert catalog.query("SELECT count(*) FROM quarantine").item() == 3
    assert run(tmp_path, tmp_path / "b.jsonl", max_bad_fraction=0.8)[0].pairs == 1


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin",
                               "WINNOW_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda d: ["ingest", str(d / "missing.jsonl")], "no such file or folder"),
        (lambda d: ["ingest", str(write_jsonl(d / "q.jsonl", [{"q": 1}]))], "cannot detect the format"),
        (lambda d: ["ingest", str(write_jsonl(d / "z.jsonl", ["{bad", "{worse"]))], "no valid pairs"),
        (lambda d: ["ingest", str(write_jsonl(d / "f.jsonl", [GOOD[0], "{bad", "{bad"]))], "above --max-bad-fraction"),
        (lambda d: ["ingest", "--format", "yaml", str(d)], "Invalid value for '--format'"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, make_args, expected: str) -> None:
    proc = _cli(make_args(tmp_path), tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert expected in proc.stderr
    if "Invalid value" not in expected:
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_ingest_and_query(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [*GOOD, GOOD[0]])
    proc = _cli(["ingest", str(path), "-w", str(tmp_path / "ws")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "4 rows read = 3 pairs + 1 quarantined" in proc.stdout
    proc = _cli(["query", "SELECT reason, count(*) AS n FROM quarantine GROUP BY 1", "--csv", "-w", "ws"], tmp_path)
    assert proc.stdout.splitlines() == ["reason,n", "duplicate,1"]
    proc = _cli(["query", "DROP TABLE pairs", "-w", "ws"], tmp_path)
    assert proc.returncode == 2 and "read-only" in proc.stderr


# -- invariants ---------------------------------------------------------------------------


def test_idempotent_rerun_same_run_id(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [*GOOD, "{bad"])
    first, catalog = run(tmp_path, path)
    second, _ = run(tmp_path, path)
    assert first.run_id == second.run_id
    counts = catalog.query("SELECT (SELECT count(*) FROM pairs) p, (SELECT count(*) FROM quarantine) q, "
                           "(SELECT count(*) FROM runs) r").row(0)
    assert counts == (3, 1, 1)


line_strategy = st.one_of(
    st.builds(lambda p, c, r: json.dumps({"prompt": p, "chosen": c, "rejected": r}), st.text(min_size=0, max_size=8),
              st.text(min_size=0, max_size=8), st.text(min_size=0, max_size=8)),
    st.text(max_size=20).map(lambda t: t.replace("\n", " ")),  # mostly malformed json
    st.sampled_from([json.dumps(GOOD[0]), json.dumps(GOOD[1]), '{"prompt": 1}', "[]", "null"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.lists(line_strategy, min_size=1, max_size=25), min_size=1, max_size=3))
def test_accounting_invariant_property(tmp_path: Path, files: list[list[str]]) -> None:
    """rows read == pairs + quarantined, per source, whatever the mix of good and bad lines."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # hypothesis may replay an example: fresh folder each time
    expected_rows = {}
    for i, lines in enumerate(files):
        path = folder / f"f{i}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        expected_rows[str(path)] = sum(1 for line in lines if line.strip(" \t\r"))  # JSON whitespace only
    catalog = Catalog(folder / "ws")
    try:
        result = ingest([str(folder)], catalog, IngestOptions(max_bad_fraction=1.0), progress=False)
    except (NoValidPairsError, UnknownFormatError):
        return  # nothing valid to keep is a legitimate outcome; the error says so
    got = {r["source"]: r for r in result.accounting.to_dicts()}
    assert {s: r["rows_read"] for s, r in got.items()} == expected_rows
    stored = dict(catalog.query("SELECT source, count(*) FROM pairs GROUP BY 1").iter_rows())
    quarantined = dict(catalog.query("SELECT source, count(*) FROM quarantine GROUP BY 1").iter_rows())
    for source, rows in expected_rows.items():
        assert rows == stored.get(source, 0) + quarantined.get(source, 0)


def _arrow_peak_while_streaming(path: Path, stream) -> int:  # noqa: ANN001 - a generator function of a path
    """Most bytes pyarrow holds at once while the stream is consumed."""
    import pyarrow as pa

    base, peak = pa.total_allocated_bytes(), 0
    for _ in stream(path):
        peak = max(peak, pa.total_allocated_bytes() - base)
    return peak


def _row_group_parquet(path: Path, row_groups: int, rows: int = 200) -> Path:
    """Random texts (no dictionary can shrink them), one row group per write."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(row_groups)

    def texts(chars: int) -> list[str]:
        return [rng.randbytes(chars // 2).hex() for _ in range(rows)]

    with pq.ParquetWriter(path, pa.schema([(c, pa.string()) for c in ("prompt", "chosen", "rejected")]),
                          use_dictionary=False) as writer:
        for _ in range(row_groups):
            table = pa.table({"prompt": texts(200), "chosen": texts(1000), "rejected": texts(1000)})
            writer.write_table(table, row_group_size=rows)
    return path


def test_parquet_streams_hold_one_row_group(tmp_path: Path) -> None:
    """Reading Parquet holds what one batch needs, not every row group read so far (pyarrow's pre-buffering did)."""
    from curation.ingest.readers import read_parquet
    from curation.score.scoring import _pair_batches

    small, large = _row_group_parquet(tmp_path / "s.parquet", 4), _row_group_parquet(tmp_path / "l.parquet", 40)
    for name, stream in {
        "ingest reader": lambda p: read_parquet(Source("parquet", str(p)), batch_size=200, max_bytes=10_000),
        "scoring batches": lambda p: _pair_batches(p, 200, None),
    }.items():
        peaks = _arrow_peak_while_streaming(small, stream), _arrow_peak_while_streaming(large, stream)
        assert peaks[1] < 1.5 * peaks[0] + (1 << 20), (name, peaks)  # 10x the file: a few MB would be 10x


def test_reader_memory_is_flat_in_file_size(tmp_path: Path) -> None:
    """The reader holds one batch: peak Python memory barely moves from 5k to 40k lines."""

    def peak(n: int) -> int:
        path = tmp_path / f"{n}.jsonl"
        line = json.dumps({"prompt": "p" * 200, "chosen": "c" * 300, "rejected": "r" * 300})
        path.write_text((line + "\n") * n, encoding="utf-8")
        tracemalloc.start()
        for _ in read_jsonl(Source("jsonl", str(path)), batch_size=1000, max_bytes=10_000):
            pass
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak_bytes

    small, large = peak(5_000), peak(40_000)
    assert large < 1.3 * small, (small, large)


# -- the invariant over the new shapes: multi-response and label-style rows ------------------------

_word = st.sampled_from(["a", "b", "yes", "no", "  ", "x y"])  # few texts: ties, duplicates and identical sides


def _uf_line(instruction: str, responses: list[str], scores: list[int]) -> str:
    completions = [{"response": r, "overall_score": s, "fine-grained_score": s, "annotations": {}, "model": "m",
                    "critique": "", "custom_system_prompt": "", "principle": "helpfulness"}
                   for r, s in zip(responses, scores, strict=False)]
    return json.dumps({"source": "evol_instruct", "instruction": instruction, "models": ["m"] * len(completions),
                       "completions": completions, "correct_answers": ["None"], "incorrect_answers": ["None"]})


shape_lines = {
    "ultrafeedback-raw": st.builds(_uf_line, _word, st.lists(_word, max_size=4),
                                   st.lists(st.integers(1, 3), min_size=4, max_size=4)),
    "shp": st.builds(lambda h, a, b, label: json.dumps({"history": h, "human_ref_A": a, "human_ref_B": b,
                                                        "labels": label, "score_A": 5, "score_B": 2}),
                     _word, _word, _word, st.sampled_from([0, 1, 2, "1", None])),
    "helpsteer2": st.builds(lambda p, a, b, s: json.dumps({"split": "train", "prompt": p, "response_1": a,
                                                           "response_2": b, "preference_strength": s}),
                            _word, _word, _word, st.integers(-3, 3)),
    "trl-style": st.builds(lambda p, a, b: json.dumps({"prompt": p, "chosen": [{"role": "user", "content": p},
                                                                                {"role": "assistant", "content": a}],
                                                       "rejected": [{"role": "user", "content": p},
                                                                    {"role": "assistant", "content": b}]}),
                           _word, _word, _word),
}
junk = st.sampled_from(['{"broken', "[]", "null", '{"chosen": 1}'])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.sampled_from(sorted(shape_lines)).flatmap(
           lambda shape: st.tuples(st.just(shape), st.lists(st.one_of(shape_lines[shape], shape_lines[shape], junk),
                                                            min_size=1, max_size=12))), min_size=1, max_size=3),
       pairing=st.sampled_from(["best-vs-worst", "best-vs-rest", "all-pairs"]), gap=st.sampled_from([0.0, 1.0, 2.0]))
def test_accounting_invariant_property_over_shapes(tmp_path: Path, files: list[tuple[str, list[str]]], pairing: str,
                                                   gap: float) -> None:
    """Every row read is paired or quarantined, once; a multi-response row may make several pairs."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    expected_rows = {}
    for i, (_, lines) in enumerate(files):
        path = folder / f"f{i}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        expected_rows[str(path)] = set(range(1, len(lines) + 1))
    catalog = Catalog(folder / "ws")
    options = IngestOptions(max_bad_fraction=1.0, pairing=pairing, min_rating_gap=gap)
    try:
        result = ingest([str(folder)], catalog, options, progress=False)
    except (NoValidPairsError, UnknownFormatError):
        return  # nothing valid to keep is a legitimate outcome; the error says so
    paired = catalog.query("SELECT source, source_row, count(*) AS n FROM pairs GROUP BY 1, 2")
    quarantined = catalog.query("SELECT DISTINCT source, source_row FROM quarantine")
    for row in result.accounting.to_dicts():
        source = row["source"]
        rows_with_pairs = set(paired.filter(pl.col("source") == source)["source_row"].to_list())
        rows_quarantined = set(quarantined.filter(pl.col("source") == source)["source_row"].to_list()) - rows_with_pairs
        assert rows_with_pairs | rows_quarantined == expected_rows[source]  # every row once, none invented
        assert row["rows_read"] == len(expected_rows[source]) == row["rows_paired"] + row["rows_quarantined"]
        assert (row["rows_paired"], row["rows_quarantined"]) == (len(rows_with_pairs), len(rows_quarantined))
        assert row["pairs"] == int(paired.filter(pl.col("source") == source)["n"].sum())
        assert row["candidates"] == row["pairs"] + row["quarantined"] - row["rows_rejected"]
        if pairing == "best-vs-worst" or row["shape"] != "ultrafeedback-raw":
            assert row["pairs"] == row["rows_paired"]  # one pair per row
    rows = catalog.query("SELECT chosen, rejected, score_chosen, score_rejected, format FROM pairs").to_dicts()
    assert all(r["chosen"] != r["rejected"] for r in rows)
    for r in rows:
        if r["format"] == "ultrafeedback-raw":
            assert r["score_chosen"] - r["score_rejected"] >= max(gap, 1)  # ties never pair; the gap holds
