"""The catalog's schema: the columns of every table, in one place (the README documents it from here).

Its own module so the schema reads as a page; curation/store.py creates and migrates the tables.
"""

from __future__ import annotations

# Columns of each table. Later stages add their tables here, never elsewhere, so the
# whole schema can be read in one place (and documented from it in the README).
TABLES: dict[str, str] = {
    "runs": """
        run_id VARCHAR PRIMARY KEY,
        created_at TIMESTAMP,
        updated_at TIMESTAMP,
        status VARCHAR,
        stage VARCHAR,
        config JSON,
        versions JSON,
        sources JSON,
        accounting JSON,
        timings JSON,
        error VARCHAR
    """,
    "pairs": """
        run_id VARCHAR,
        pair_id VARCHAR,
        prompt VARCHAR,
        chosen VARCHAR,
        rejected VARCHAR,
        prompt_messages JSON,
        chosen_messages JSON,
        rejected_messages JSON,
        tools JSON,
        score_chosen DOUBLE,
        score_rejected DOUBLE,
        source VARCHAR,
        source_row BIGINT,
        pair_index INTEGER,
        format VARCHAR,
        pairing VARCHAR,
        PRIMARY KEY (run_id, pair_id)
    """,
    "quarantine": """
        run_id VARCHAR,
        source VARCHAR,
        source_row BIGINT,
        reason VARCHAR,
        detail VARCHAR,
        raw VARCHAR
    """,
    "scores": """
        run_id VARCHAR,
        pair_id VARCHAR,
        prompt_chars BIGINT, chosen_chars BIGINT, rejected_chars BIGINT,
        char_edit_distance BIGINT, char_edit_norm DOUBLE,
        prompt_tokens BIGINT, chosen_tokens BIGINT, rejected_tokens BIGINT,
        token_edit_distance BIGINT, token_edit_norm DOUBLE,
        first_diff_token BIGINT, shared_prefix_tokens BIGINT, first_diff_frac DOUBLE,
        length_gap BIGINT, length_ratio DOUBLE,
        chosen_truncated BOOLEAN, rejected_truncated BOOLEAN, uneven_truncation BOOLEAN, fits_max_length BOOLEAN,
        ref_chosen_logps DOUBLE, ref_rejected_logps DOUBLE, ref_chosen_logps_mean DOUBLE, ref_rejected_logps_mean DOUBLE,
        reward_chosen DOUBLE, reward_rejected DOUBLE, margin DOUBLE, margin_source VARCHAR,
        tokenizer VARCHAR, max_length BIGINT,
        PRIMARY KEY (run_id, pair_id)
    """,
    "margins": """
        run_id VARCHAR,
        pair_id VARCHAR,
        margin_source VARCHAR,
        margin DOUBLE,
        reward_chosen DOUBLE,
        reward_rejected DOUBLE
    """,
    "decisions": """
        run_id VARCHAR,
        pair_id VARCHAR,
        kept BOOLEAN,
        reason VARCHAR,
        detail VARCHAR,
        weight DOUBLE,
        stage INTEGER,
        stage_position BIGINT,
        PRIMARY KEY (run_id, pair_id)
    """,
    # near-duplicate clusters (curation/near_dup.py): one row per member; duplicate_of is the kept pair
    "clusters": """
        run_id VARCHAR,
        cluster_id INTEGER,
        pair_id VARCHAR,
        representative BOOLEAN,
        duplicate_of VARCHAR,
        size INTEGER,
        prompt_similarity DOUBLE,
        response_similarity DOUBLE,
        orientation VARCHAR,
        contradiction BOOLEAN,
        PRIMARY KEY (run_id, pair_id)
    """,
    # benchmark n-gram hits (curation/decontam.py): one row per pair, benchmark and pair field
    "contamination": """
        run_id VARCHAR,
        pair_id VARCHAR,
        benchmark VARCHAR,
        benchmark_row BIGINT,
        benchmark_field VARCHAR,
        field VARCHAR,
        ngrams BIGINT,
        span VARCHAR
    """,
    # Online curation (training/online.py): round k re-decides, with the stage-k policy's margin, the
    # pairs not yet taught (later stages and the beta filter's drops). Round 0 is `decisions`.
    "decision_rounds": """
        run_id VARCHAR,
        round INTEGER,
        pair_id VARCHAR,
        scoring_model VARCHAR,
        reference_model VARCHAR,
        margin_source VARCHAR,
        margin DOUBLE,
        weight DOUBLE,
        kept BOOLEAN,
        reason VARCHAR,
        stage INTEGER,
        stage_position BIGINT,
        previous_kept BOOLEAN,
        detail VARCHAR,
        PRIMARY KEY (run_id, round, pair_id)
    """,
    "stages": """
        run_id VARCHAR,
        stage INTEGER,
        pairs BIGINT,
        order_by VARCHAR,
        margin_min DOUBLE,
        margin_max DOUBLE,
        margin_mean DOUBLE,
        PRIMARY KEY (run_id, stage)
    """,
    "shards": """
        run_id VARCHAR,
        stage INTEGER,
        path VARCHAR,
        rows BIGINT,
        bytes BIGINT,
        sha256 VARCHAR
    """,
    "advice": """
        run_id VARCHAR PRIMARY KEY,
        objective VARCHAR,
        params JSON,
        evidence JSON,
        rationale VARCHAR
    """,
    "train_metrics": """
        run_id VARCHAR,
        stage INTEGER,
        objective VARCHAR,
        step BIGINT,
        epoch DOUBLE,
        loss DOUBLE,
        beta DOUBLE,
        kept_fraction DOUBLE,
        rewards_chosen DOUBLE,
        rewards_rejected DOUBLE,
        rewards_margins DOUBLE,
        rewards_accuracies DOUBLE,
        logps_chosen DOUBLE,
        logps_rejected DOUBLE,
        learning_rate DOUBLE,
        grad_norm DOUBLE,
        logged_at TIMESTAMP
    """,
    "evals": """
        run_id VARCHAR,
        model VARCHAR,
        metric VARCHAR,
        value DOUBLE,
        n BIGINT,
        details JSON
    """,
}


def table_columns(ddl: str) -> list[str]:
    """Column names of a TABLES entry (constraints such as PRIMARY KEY skipped)."""
    names = []
    for part in ddl.replace("\n", " ").split(","):
        word = part.strip().split(" ", 1)[0]
        if word and word.upper() not in ("PRIMARY", "KEY", "UNIQUE") and not word.endswith(")"):
            names.append(word)
    return names


def column_types(ddl: str) -> list[tuple[str, str]]:
    """(name, type) of each column of a TABLES entry, for adding it to an older table."""
    out = []
    for part in ddl.replace("\n", " ").split(","):
        words = part.strip().split()
        if len(words) >= 2 and words[0].upper() not in ("PRIMARY", "KEY", "UNIQUE") and not words[0].endswith(")"):
            out.append((words[0], " ".join(words[1:])))
    return out
