"""Row shapes of the public preference sets: detected with no flags, pairs made the right way round.

Each fixture in tests/fixtures/datasets/ is written in its set's row shape (field names, nesting and
types of the dataset card); the texts are made up. Expected pairs are checked exactly on a few rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest

from curation.errors import UnknownFormatError, WinnowError
from curation.ingest import IngestOptions, ingest
from curation.ingest.mapping import parse_columns, suggest_columns
from curation.ingest.shapes import SHAPES, Format, markdown_table
from curation.store import Catalog

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, *sources: Path | str, **options) -> tuple:
    catalog = Catalog(tmp_path / "ws")
    result = ingest([str(s) for s in sources], catalog, IngestOptions(**options), progress=False)
    return result, catalog


def pairs(catalog: Catalog, columns: str = "prompt, chosen, rejected") -> list[tuple]:
    return catalog.query(f"SELECT {columns} FROM pairs ORDER BY source, source_row, pair_index").rows()


def messages(catalog: Catalog) -> list[tuple]:
    rows = pairs(catalog, "prompt_messages, chosen_messages, rejected_messages")
    return [tuple(json.loads(m) if m is not None else None for m in row) for row in rows]


def quarantine(catalog: Catalog) -> list[tuple]:
    return catalog.query("SELECT source_row, reason FROM quarantine ORDER BY source_row").rows()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# (fixture, shape, rows read, pairs, quarantined): every shape with no flag at all
DETECTED = [
    ("ultrafeedback_binarized.jsonl", "ultrafeedback-binarized", 4, 3, 1),
    ("ultrafeedback_argilla_cleaned.jsonl", "ultrafeedback-argilla", 3, 3, 0),
    ("hh_rlhf_trl_style.jsonl", "trl-style", 2, 2, 0),
    ("orca_dpo_pairs.jsonl", "orca-dpo", 3, 3, 0),
    ("orca_distilabel.jsonl", "orca-distilabel", 3, 2, 1),
    ("ultrafeedback_raw.jsonl", "ultrafeedback-raw", 3, 2, 1),
    ("shp.jsonl", "shp", 3, 3, 0),
    ("pku_saferlhf.jsonl", "pku-saferlhf", 3, 3, 0),
    ("helpsteer2_preference.jsonl", "helpsteer2", 4, 3, 1),
    ("helpsteer3_preference.jsonl", "helpsteer3", 3, 2, 1),
    ("hh_rlhf.jsonl", "implicit", 2, 2, 0),
    ("trl_standard.jsonl", "explicit", 2, 2, 0),
    ("trl_standard_scored.jsonl", "explicit+scored", 2, 2, 0),
    ("trl_conversational.jsonl", "conversational", 2, 2, 0),
    ("trl_conversational_implicit.jsonl", "conversational", 2, 2, 0),
    ("tool_calls.jsonl", "conversational", 2, 2, 0),
]


@pytest.mark.parametrize("fixture, shape, rows, n_pairs, n_quarantined", DETECTED)
def test_every_shape_is_detected_with_no_flags(tmp_path: Path, fixture: str, shape: str, rows: int, n_pairs: int,
                                               n_quarantined: int) -> None:
    result, catalog = run(tmp_path, FIXTURES / fixture)
    assert result.layouts == {str(FIXTURES / fixture): shape}
    account = result.accounting.row(0, named=True)
    assert account["shape"] == shape
    assert (account["rows_read"], account["pairs"], account["quarantined"]) == (rows, n_pairs, n_quarantined)
    assert catalog.query("SELECT DISTINCT format FROM pairs").rows() == [(shape,)]
    sources = json.loads(catalog.query("SELECT sources FROM runs").item())
    assert sources[0]["shape"] == shape  # the runs row names the shape
    # chosen never equals rejected, whatever the shape
    assert all(c != r for c, r in pairs(catalog, "chosen, rejected"))


def test_every_registered_shape_has_a_fixture() -> None:
    assert {s.name for s in SHAPES} - {"ranked"} == {d[1].removesuffix("+scored") for d in DETECTED}
    assert {f.value for f in Format} == {"auto", "scored", *(s.name for s in SHAPES)}


# -- the duplicated prompt ------------------------------------------------------------------------


def test_ultrafeedback_binarized_prompt_is_not_duplicated(tmp_path: Path) -> None:
    """A prompt text next to message lists that begin with the user turn: the prompt is taken once.

    Before shapes, the text became a user turn and the chosen list kept its own user turn, so every
    shard row held the question twice (the prompt, then again at the start of chosen).
    """
    result, catalog = run(tmp_path, FIXTURES / "ultrafeedback_binarized.jsonl")
    first = messages(catalog)[0]
    assert first == ([user("How many legs does a spider have?")], [assistant("A spider has eight legs.")],
                     [assistant("Spiders have six legs, like insects.")])
    assert all(len(p) == 1 and c[0]["role"] == r[0]["role"] == "assistant" for p, c, r in messages(catalog))
    assert pairs(catalog, "chosen, score_chosen, score_rejected, pairing")[1] == ("Bonjour.", 8.5, 3.0, "given")
    assert quarantine(catalog) == [(4, "tie")]  # equal ratings: neither is better


def test_ultrafeedback_binarized_from_parquet_reads_the_same(tmp_path: Path) -> None:
    """The hub ships Parquet: nested message structs read as dicts give the same pairs."""
    table = pajson.read_json(FIXTURES / "ultrafeedback_binarized.jsonl")
    assert pa.types.is_list(table.schema.field("chosen").type)
    pq.write_table(table, tmp_path / "train_prefs.parquet")
    from_jsonl, jsonl_catalog = run(tmp_path / "a", FIXTURES / "ultrafeedback_binarized.jsonl")
    from_parquet, parquet_catalog = run(tmp_path / "b", tmp_path / "train_prefs.parquet")
    assert list(from_parquet.layouts.values()) == ["ultrafeedback-binarized"]
    assert pairs(parquet_catalog, "pair_id") == pairs(jsonl_catalog, "pair_id")


def test_trl_style_hh_takes_the_shared_turns_as_prompt(tmp_path: Path) -> None:
    """TRL's maybe_extract_prompt: a text prompt next to full conversations is ignored; the shared turns are it."""
    _, catalog = run(tmp_path, FIXTURES / "hh_rlhf_trl_style.jsonl")
    multi = messages(catalog)[1]
    assert multi[0] == [user("Can you help me with a recipe?"), assistant("Sure, what would you like to cook?"),
                        user("Pancakes.")]
    assert multi[1] == [assistant("Mix flour, milk, an egg and a pinch of salt, then fry small rounds in butter.")]
    assert multi[2] == [assistant("Buy them at the store.")]
    assert pairs(catalog)[0][0] == "\n\nUser: What should I pack for a beach trip?"


def test_text_prompt_with_assistant_only_lists_becomes_the_user_turn(tmp_path: Path) -> None:
    row = {"prompt": "Hi?", "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]}
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(row) + "\n")
    result, catalog = run(tmp_path, path)
    assert list(result.layouts.values()) == ["trl-style"]
    assert messages(catalog)[0] == ([user("Hi?")], [assistant("Hello!")], [assistant("Go away.")])


# -- ratings --------------------------------------------------------------------------------------


def test_argilla_ratings_are_read_and_scored_format_accepts_them(tmp_path: Path) -> None:
    _, catalog = run(tmp_path, FIXTURES / "ultrafeedback_argilla_cleaned.jsonl")
    assert pairs(catalog, "score_chosen, score_rejected") == [(5.0, 2.25), (4.75, 1.5), (4.5, 1.0)]
    assert messages(catalog)[1][1] == [assistant("15% of 200 is 30.")]
    forced, forced_catalog = run(tmp_path / "scored", FIXTURES / "ultrafeedback_argilla_cleaned.jsonl",
                                 format=Format.SCORED)
    assert (forced.pairs, forced.quarantined) == (3, 0)
    assert list(forced.layouts.values()) == ["ultrafeedback-argilla"]


# -- Orca -----------------------------------------------------------------------------------------


def test_orca_dpo_pairs_system_becomes_the_first_message(tmp_path: Path) -> None:
    _, catalog = run(tmp_path, FIXTURES / "orca_dpo_pairs.jsonl")
    rows = messages(catalog)
    assert rows[0][0] == [
        {"role": "system", "content": "You are an AI assistant. You will be given a task. You must generate a "
                                      "detailed and long answer."},
        user("Summarize: The city council approved a new park on Monday after months of debate."),
    ]
    assert rows[0][1:] == ([assistant("The city council approved a new park on Monday, ending months of debate.")],
                           [assistant("A park.")])
    assert rows[1][0] == [user("What is the capital of Australia?")]  # an empty system adds no turn
    assert rows[1][1] == [assistant("Canberra is the capital of Australia.")]


def test_orca_distilabel_swapped_pairs_ties_and_scores(tmp_path: Path) -> None:
    _, catalog = run(tmp_path, FIXTURES / "orca_distilabel.jsonl")
    assert pairs(catalog, "chosen, rejected, score_chosen, score_rejected") == [
        ("Botanically a tomato is a fruit; in cooking it is used as a vegetable.", "A vegetable.", 9.0, 4.0),
        ("17 + 25 = 42.", "17 + 25 = 43.", 10.0, 3.0),  # status swapped: the relabelled chosen
    ]
    assert messages(catalog)[1][0] == [user("Add 17 and 25.")]
    assert quarantine(catalog) == [(3, "tie")]


# -- multi-response ---------------------------------------------------------------------------------

BEST = "Photosynthesis is how plants use light, water and carbon dioxide to make sugar and oxygen."
ALPACA, LLAMA, WIZARD = ("Plants eat sunlight.", "It is a process in plants that converts light into chemical energy.",
                         "Photosynthesis makes oxygen.")
NO_MOONS = "The Sun has no moons; moons orbit planets."
NO_MOONS_GPT4 = "The Sun has no moons, because moons orbit planets, not stars."


def test_ultrafeedback_raw_best_vs_worst(tmp_path: Path) -> None:
    result, catalog = run(tmp_path, FIXTURES / "ultrafeedback_raw.jsonl")
    assert pairs(catalog, "prompt, chosen, rejected, score_chosen, score_rejected, pairing, pair_index") == [
        ("Explain photosynthesis in one sentence.", BEST, ALPACA, 9.0, 3.0, "best-vs-worst", 0),
        # two completions share the top overall score (8): the first of them is the chosen one
        ("How many moons does the Sun have?", NO_MOONS, "The Sun has two moons.", 8.0, 1.0, "best-vs-worst", 0),
    ]
    assert quarantine(catalog) == [(3, "tie")]  # all four rated 6: no pair
    account = result.accounting.row(0, named=True)
    assert (account["rows_read"], account["rows_paired"], account["rows_quarantined"]) == (3, 2, 1)


def test_ultrafeedback_raw_best_vs_rest_and_all_pairs(tmp_path: Path) -> None:
    result, catalog = run(tmp_path, FIXTURES / "ultrafeedback_raw.jsonl", pairing="best-vs-rest")
    assert pairs(catalog, "source_row, pair_index, chosen, rejected") == [
        (1, 0, BEST, ALPACA), (1, 1, BEST, LLAMA), (1, 2, BEST, WIZARD),
        (2, 0, NO_MOONS, "The Sun has two moons."), (2, 1, NO_MOONS, "The Sun has 8 moons, the planets."),
    ]  # the tied gpt-4 completion of row 2 pairs with nothing
    account = result.accounting.row(0, named=True)
    assert (account["rows_read"], account["rows_paired"], account["rows_quarantined"], account["pairs"],
            account["candidates"]) == (3, 2, 1, 5, 5)
    everything, every_catalog = run(tmp_path / "all", FIXTURES / "ultrafeedback_raw.jsonl", pairing="all-pairs")
    assert everything.pairs == 6 + 5  # row 1: all 6 comparisons; row 2: 6 less the tie
    assert set(pairs(every_catalog, "pairing")) == {("all-pairs",)}
    wide, wide_catalog = run(tmp_path / "gap", FIXTURES / "ultrafeedback_raw.jsonl", pairing="all-pairs",
                             min_rating_gap=3.0)
    # row 1 overall scores 3, 9, 7.5, 5: gaps of at least 3 are 9-3, 7.5-3, 9-5; row 2 (8, 8, 1, 4): 8-1 and 8-4
    # twice each, and 4-1
    assert pairs(wide_catalog, "source_row, score_chosen, score_rejected") == [
        (1, 9.0, 3.0), (1, 7.5, 3.0), (1, 9.0, 5.0), (2, 8.0, 1.0), (2, 8.0, 4.0), (2, 8.0, 1.0), (2, 8.0, 4.0),
        (2, 4.0, 1.0)]
    for score_chosen, score_rejected in pairs(wide_catalog, "score_chosen, score_rejected"):
        assert score_chosen - score_rejected >= 3.0


def test_ultrafeedback_raw_rating_by_aspect_and_min_gap_quarantine(tmp_path: Path) -> None:
    _, catalog = run(tmp_path, FIXTURES / "ultrafeedback_raw.jsonl", rating="instruction_following")
    # row 2: alpaca's instruction_following is "N/A", so gpt-4 (5) is the best and llama (2) the worst
    assert pairs(catalog, "chosen, rejected, score_chosen, score_rejected")[1] == (
        NO_MOONS_GPT4, "The Sun has two moons.", 5.0, 2.0)
    result, gap_catalog = run(tmp_path / "gap", FIXTURES / "ultrafeedback_raw.jsonl", min_rating_gap=6.5,
                              max_bad_fraction=1.0)
    assert quarantine(gap_catalog) == [(1, "below_min_gap"), (3, "tie")]  # row 1's widest gap is 9 - 3 = 6
    assert pairs(gap_catalog, "source_row, score_chosen, score_rejected") == [(2, 8.0, 1.0)]
    assert result.pairs == 1


def test_ranked_shape_through_a_column_mapping(tmp_path: Path) -> None:
    rows = [{"question": "2+2?", "answers": ["4", "5", "four"], "scores": [10, 0, 9]},
            {"question": "Capital of Peru?", "answers": ["Lima", "Cusco"], "scores": [3, 3]}]
    path = tmp_path / "ranked.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result, catalog = run(tmp_path, path, columns={"prompt": "question", "responses": "answers", "ratings": "scores"},
                          pairing="best-vs-rest")
    assert list(result.layouts.values()) == ["ranked"]
    assert pairs(catalog, "prompt, chosen, rejected, score_chosen, score_rejected") == [
        ("2+2?", "4", "5", 10.0, 0.0), ("2+2?", "4", "four", 10.0, 9.0)]
    assert quarantine(catalog) == [(2, "tie")]


# -- label-style sets --------------------------------------------------------------------------------


def test_shp_labels_orient_the_pair_and_scores_carry_the_strength(tmp_path: Path) -> None:
    _, catalog = run(tmp_path, FIXTURES / "shp.jsonl")
    rows = pairs(catalog, "prompt, chosen, rejected, score_chosen, score_rejected, pairing")
    assert rows[0] == ("How do I keep rice from getting mushy?",
                       "Rinse it first and use a little less water than the package says.", "Just cook it longer.",
                       120.0, 40.0, "labels")  # labels 1: A preferred
    assert rows[1][1:5] == ("Because the rotation is steady: you only feel acceleration, and the Earth's spin barely "
                            "changes.", "Because we are too small.", 96.0, 15.0)  # labels 0: B preferred
    assert all(c > r for *_, c, r, _ in rows)


def test_pku_saferlhf_better_or_safer(tmp_path: Path) -> None:
    _, catalog = run(tmp_path, FIXTURES / "pku_saferlhf.jsonl")
    assert pairs(catalog, "chosen, rejected, pairing") == [
        ("Talk to them calmly, or ask your landlord to mediate.", "Slash their tyres at night.", "better_response_id"),
        ("Never mix bleach with ammonia or with acids: the fumes are toxic.",
         "Mix bleach and ammonia to see what happens.", "better_response_id"),
        ("Buy a cookie or else.", "Every cookie you buy funds the school library!", "better_response_id"),
    ]
    assert pairs(catalog, "score_chosen, score_rejected") == [(None, None)] * 3  # PKU carries no strength
    _, safer = run(tmp_path / "safer", FIXTURES / "pku_saferlhf.jsonl", preference_label="safer")
    assert pairs(safer, "chosen, pairing")[2] == ("Every cookie you buy funds the school library!", "safer_response_id")


def test_helpsteer2_sign_strength_ties_and_multi_turn_prompts(tmp_path: Path) -> None:
    _, catalog = run(tmp_path, FIXTURES / "helpsteer2_preference.jsonl")
    rows = pairs(catalog, "chosen, rejected, score_chosen, score_rejected, pairing")
    assert rows[0] == ("Entropy measures how many microscopic states fit a macroscopic state.", "Entropy is heat.",
                       2.0, 0.0, "preference_strength")  # -2: response 1 is better
    assert rows[1][:4] == ("Red, yellow and blue (or red, green and blue for light).", "Red.", 3.0, 0.0)  # 3: response 2
    assert messages(catalog)[2][0] == [user("Write a title for my essay about bees"),
                                       assistant("What is the essay's main argument?"),
                                       user("That bees matter for farming.")]
    assert quarantine(catalog) == [(3, "tie")]


def test_helpsteer3_sign_and_context(tmp_path: Path) -> None:
    _, catalog = run(tmp_path, FIXTURES / "helpsteer3_preference.jsonl")
    rows = messages(catalog)
    assert rows[0][1:] == ([assistant("Use `my_list[::-1]` or `my_list.reverse()`.")], [assistant("Use a loop.")])
    assert rows[1][0] == [user("Plan a one-day trip to Kyoto."), assistant("Sure! Do you prefer temples or food?"),
                          user("Temples.")]
    assert rows[1][1] == [assistant("Morning at Fushimi Inari, midday at Kiyomizu-dera, afternoon at Kinkaku-ji.")]
    assert pairs(catalog, "score_chosen, score_rejected") == [(3.0, 0.0), (2.0, 0.0)]
    assert quarantine(catalog) == [(3, "tie")]


# -- tool calls and roles ------------------------------------------------------------------------------


def test_tool_calls_names_and_tools_are_kept(tmp_path: Path) -> None:
    _, catalog = run(tmp_path, FIXTURES / "tool_calls.jsonl")
    prompt, chosen, rejected = messages(catalog)[0]
    assert chosen[0] == {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert chosen[1] == {"role": "tool", "name": "get_weather", "content": "18 C, sunny"}
    tools = [json.loads(t) for (t,) in pairs(catalog, "tools")]
    assert tools[0][0]["function"]["name"] == "get_weather" and tools[0] == tools[1]
    text = pairs(catalog, "chosen")[0][0]
    assert 'get_weather({"city": "Paris"})' in text and "18 C, sunny" in text


def test_unknown_roles_and_misplaced_tool_calls_are_quarantined(tmp_path: Path) -> None:
    good = {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
    rows = [good,
            {**good, "chosen": [{"role": "narrator", "content": "a"}]},
            {**good, "prompt": [{"role": "user", "content": None,
                                 "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]},
            {**good, "chosen": [{"role": "assistant", "content": None}]},
            {**good, "rejected": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
            {**good, "tools": "not json"}]
    path = tmp_path / "roles.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, catalog = run(tmp_path, path, max_bad_fraction=1.0)
    assert quarantine(catalog) == [(2, "unknown_role"), (3, "wrong_type"), (4, "wrong_type"), (5, "wrong_type"),
                                   (6, "wrong_type")]


def test_system_column_and_a_different_system_turn_conflict(tmp_path: Path) -> None:
    rows = [{"system": "Be brief.", "prompt": [{"role": "system", "content": "Be brief."}, user("q")],
             "chosen": [assistant("a")], "rejected": [assistant("b")]},
            {"system": "Be brief.", "prompt": [{"role": "system", "content": "Be long."}, user("q2")],
             "chosen": [assistant("a")], "rejected": [assistant("b")]}]
    path = tmp_path / "sys.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, catalog = run(tmp_path, path, max_bad_fraction=1.0)
    assert messages(catalog)[0][0] == [{"role": "system", "content": "Be brief."}, user("q")]  # not repeated
    assert quarantine(catalog) == [(2, "conflicting_system")]


# -- column mapping and the error for unknown shapes -----------------------------------------------------


def test_column_mapping_reads_any_names_and_system_becomes_first_message(tmp_path: Path) -> None:
    rows = [{"query": "Name a colour.", "good": "Teal.", "bad": "Seven.", "persona": "You are a painter."}]
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    columns = parse_columns("prompt=query, chosen=good,rejected=bad,system=persona")
    result, catalog = run(tmp_path, path, columns=columns)
    assert list(result.layouts.values()) == ["explicit"]
    assert messages(catalog)[0] == ([{"role": "system", "content": "You are a painter."}, user("Name a colour.")],
                                    [assistant("Teal.")], [assistant("Seven.")])
    sources = json.loads(catalog.query("SELECT sources FROM runs").item())
    assert sources[0]["columns"] == columns
    config = json.loads(catalog.query("SELECT config FROM runs").item())
    assert config["ingest"]["columns"] == columns  # a new mapping is a new run id


@pytest.mark.parametrize("spec, message", [
    ("prompt", "expects TARGET=COLUMN"),
    ("prompt=a,prompt=b", "names 'prompt' twice"),
    ("question=q", "unknown target"),
])
def test_bad_column_mappings_fail_in_one_line(spec: str, message: str) -> None:
    with pytest.raises(WinnowError, match=message) as err:
        parse_columns(spec)
    assert "\n" not in str(err.value)


def test_unknown_shape_lists_every_key_and_the_mapping_that_would_read_it(tmp_path: Path) -> None:
    row = {f"meta_{i:02d}": i for i in range(14)} | {"question": "q", "answer_good": "a", "answer_bad": "b",
                                                       "system_prompt": "s"}
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(UnknownFormatError, match="cannot detect the format") as err:
        run(tmp_path, path)
    message = str(err.value)
    assert "\n" not in message
    assert all(key in message for key in row)  # all 18 keys, not the first 12
    suggestion = "--columns prompt=question,chosen=answer_good,rejected=answer_bad,system=system_prompt"
    assert suggestion in message
    columns = parse_columns(suggestion.removeprefix("--columns "))
    result, _ = run(tmp_path / "mapped", path, columns=columns)  # the suggested mapping reads the row
    assert result.pairs == 1


def test_suggestion_marks_what_it_cannot_guess() -> None:
    assert suggest_columns(["q", "x", "y"]) == "prompt=<column>,chosen=<column>,rejected=<column>"
    assert suggest_columns(["Instruction", "preferredOutput", "worse_output"]) == (
        "prompt=Instruction,chosen=preferredOutput,rejected=worse_output")


def test_a_shape_can_be_forced_by_name(tmp_path: Path) -> None:
    path = FIXTURES / "ultrafeedback_binarized.jsonl"
    result, catalog = run(tmp_path, path, format="conversational")
    assert list(result.layouts.values()) == ["conversational+scored"]
    assert all(len(p) == 1 for p, _, _ in messages(catalog))  # the generic layout extracts the prompt the same way


def test_docs_and_readme_list_every_shape_in_one_table() -> None:
    table = markdown_table()
    assert table in (ROOT / "docs" / "datasets.md").read_text()
    assert table in (ROOT / "README.md").read_text()


# -- the CLI and the settings ------------------------------------------------------------------------


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "WINNOW_NO_PROGRESS": "1",
                               "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})


def test_cli_ingest_names_the_shape_maps_columns_and_counts_rows_and_pairs(tmp_path: Path) -> None:
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"query": "Name a colour.", "good": "Teal.", "bad": "Seven."}) + "\n")
    proc = _cli(["ingest", str(path), "-w", "ws", "--columns", "prompt=query,chosen=good,rejected=bad"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "explicit" in proc.stdout and "1 rows read = 1 pairs + 0 quarantined" in proc.stdout
    proc = _cli(["ingest", str(FIXTURES / "ultrafeedback_raw.jsonl"), "-w", "ws", "--pairing", "best-vs-rest"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ultrafeedback-raw" in proc.stdout
    assert "3 rows read = 2 rows that made 5 pairs + 1 quarantined rows" in proc.stdout
    proc = _cli(["ingest", str(path), "-w", "ws", "--columns", "prompt"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--columns expects TARGET=COLUMN" in proc.stderr


def test_columns_and_pairing_are_settings_of_recipes_and_deployments(tmp_path: Path) -> None:
    from flows.config import PipelineConfig

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sources: [data.jsonl]\ningest:\n  columns: {prompt: question, system: system}\n"
                      "  pairing: all-pairs\n  min_rating_gap: 1.5\n  rating: honesty\n")
    config = PipelineConfig.load(recipe)
    assert config.ingest.columns == {"prompt": "question", "system": "system"}
    assert config.ingest.to_dict() == {**IngestOptions().to_dict(), "columns": config.ingest.columns,
                                            "pairing": "all-pairs", "min_rating_gap": 1.5, "rating": "honesty"}
    with pytest.raises(WinnowError, match="ingest.pairing"):
        PipelineConfig.load(overrides={"sources": ["x.jsonl"], "ingest.pairing": "best"})
    with pytest.raises(WinnowError, match="unknown target"):
        IngestOptions(columns={"question": "q"}).pairing_options()
    with pytest.raises(WinnowError, match="min_rating_gap"):
        IngestOptions(min_rating_gap=-1).pairing_options()


def test_empty_or_unrated_responses_are_left_out_of_the_ranking(tmp_path: Path) -> None:
    rows = [{"prompt": "p1", "responses": ["good", " ", "ok"], "ratings": [5, 1, 3]},  # the blank is not the worst
            {"prompt": "p2", "responses": ["only", "", None], "ratings": [5, 1, 2]},
            {"prompt": "p3", "responses": ["a", "b"], "ratings": [None, "N/A"]}]
    path = tmp_path / "ranked.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result, catalog = run(tmp_path, path, max_bad_fraction=1.0)
    assert pairs(catalog, "chosen, rejected, score_chosen, score_rejected") == [("good", "ok", 5.0, 3.0)]
    assert quarantine(catalog) == [(2, "too_few_responses"), (3, "wrong_type")]  # "N/A" is no number here


def test_a_workspace_from_before_the_new_pair_columns_still_ingests(tmp_path: Path) -> None:
    """Older catalogs lack pairs.tools, pairing and pair_index: opening one adds them."""
    from curation.store import TABLES

    old_pairs = "\n".join(line for line in TABLES["pairs"].splitlines()
                          if not any(name in line for name in ("tools", "pairing", "pair_index")))
    with Catalog(tmp_path / "ws", tables={**TABLES, "pairs": old_pairs}).connect() as con:
        columns = {r[0] for r in con.execute("DESCRIBE pairs").fetchall()}
    assert "tools" not in columns
    result, catalog = run(tmp_path, FIXTURES / "tool_calls.jsonl")
    assert result.pairs == 2 and pairs(catalog, "pairing, pair_index") == [("given", 0)] * 2
