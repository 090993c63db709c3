"""Per-pair text and token statistics: edit distances, lengths, shared prefix, truncation.

Why these: a low edit distance between chosen and rejected marks the pairs where DPO
lowers the chosen likelihood (DPOP's case); the chosen-minus-rejected length gap marks a
length bias (LN-DPO's case); uneven truncation silently changes what a pair teaches.
All kernels are rapidfuzz batch calls (`process.cpdist`, all cores) and numpy/polars.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein, Prefix

from curation.lm.tokenization import TokenizedPairs


def _pairwise(a: Sequence, b: Sequence, scorer) -> np.ndarray:  # noqa: ANN001 - rapidfuzz scorer
    if len(a) == 0:
        return np.zeros(0, dtype=np.int64)
    return process.cpdist(a, b, scorer=scorer, workers=-1, dtype=np.int64)


def _normalised(distance: pl.Expr, left: pl.Expr, right: pl.Expr) -> pl.Expr:
    """Levenshtein distance over the longer length; 0 for two empty sequences."""
    longest = pl.max_horizontal(left, right)
    return pl.when(longest > 0).then(distance / longest).otherwise(0.0)


def text_features(prompts: Sequence[str], chosens: Sequence[str], rejecteds: Sequence[str]) -> pl.DataFrame:
    distance = _pairwise(chosens, rejecteds, Levenshtein.distance)
    frame = pl.DataFrame(
        {
            "prompt_chars": pl.Series(prompts, dtype=pl.String).str.len_chars(),
            "chosen_chars": pl.Series(chosens, dtype=pl.String).str.len_chars(),
            "rejected_chars": pl.Series(rejecteds, dtype=pl.String).str.len_chars(),
            "char_edit_distance": distance,
        }
    )
    return frame.with_columns(
        char_edit_norm=_normalised(pl.col("char_edit_distance"), pl.col("chosen_chars"), pl.col("rejected_chars"))
    )


def token_features(tokens: TokenizedPairs) -> pl.DataFrame:
    """Token statistics on the training tokenizer's ids, completions as TRL builds them (with EOS)."""
    distance = _pairwise(tokens.chosen_ids, tokens.rejected_ids, Levenshtein.distance)
    common = _pairwise(tokens.chosen_ids, tokens.rejected_ids, Prefix.similarity)
    lengths = {
        "prompt_tokens": np.fromiter(map(len, tokens.prompt_ids), np.int64, len(tokens)),
        "chosen_tokens": np.fromiter(map(len, tokens.chosen_ids), np.int64, len(tokens)),
        "rejected_tokens": np.fromiter(map(len, tokens.rejected_ids), np.int64, len(tokens)),
    }
    frame = pl.DataFrame(
        {
            **lengths,
            "token_edit_distance": distance,
            "first_diff_token": common,
            "chosen_truncated": tokens.chosen_truncated,
            "rejected_truncated": tokens.rejected_truncated,
            "fits_max_length": tokens.keep,
        }
    )
    chosen, rejected = pl.col("chosen_tokens"), pl.col("rejected_tokens")
    return frame.with_columns(
        token_edit_norm=_normalised(pl.col("token_edit_distance"), chosen, rejected),
        shared_prefix_tokens=pl.col("prompt_tokens") + pl.col("first_diff_token"),
        first_diff_frac=pl.col("first_diff_token") / pl.max_horizontal(chosen, 1),
        length_gap=chosen - rejected,
        length_ratio=chosen / pl.max_horizontal(rejected, 1),
        uneven_truncation=pl.col("chosen_truncated") != pl.col("rejected_truncated"),
    )
