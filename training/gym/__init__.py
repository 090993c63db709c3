"""The preference gym: every method side by side on a task whose truth is known.

Why a gym: the five papers report gains on large models judged by humans or GPT-4, which
cannot run here. The sorting task (training/sorting.py) has an exact gold reward, planted
pathologies with hidden truth columns (flipped labels, verbose chosen sides, one-swap
low-edit pairs) and a tiny model that learns it on a CPU, so each claim can be checked.

One experiment, per label-noise level (``noise_levels``, default 0%, 20%, 40%) and seed:

1. data: one preference set (``PreferenceSetConfig``: label noise, verbosity bias, low-edit
   share, ...) written as JSONL and ingested into a per-seed catalog, like any user data;
2. reference: one SFT'd winnow-tiny model per seed, built from that seed's pairs exactly as
   the pipeline builds it (prompt -> chosen warm-up); every arm of the seed starts from it
   and is measured against it;
3. scoring and curation: the real ``score_run`` (ratings margin, reference log-probs) and
   ``curate`` (rules, beta-guided filter, 2 sDPO stages, advice); the filter's drops are
   scored against the hidden ``is_flipped`` column (precision, recall); the curated arm's
   ablations get their own curations of the same scored pairs (``prepare.CURATIONS``);
4. arms (the registry in :mod:`training.gym.arms`), all under the same budget of optimizer
   steps (see :func:`budget_steps`):

   - ``trl-dpo``: TRL's own ``DPOTrainer`` (loss_type sigmoid) on the raw set;
   - ``winnow-curated``: filter + sDPO stages + advised objective (``train_stages``, auto);
   - ``dpop``, ``ln-dpo``, ``minor-dpo``, ``beta-dpo``: each preset alone on the raw set;
   - ``sdpo``: the raw set in 2 margin-ordered stages (easy first), plain DPO;
   - ``offline-filter``: curation's kept pairs in one stage, plain DPO;
   - ablations of ``winnow-curated``, one part changed each: ``curated-no-filter`` (no
     beta-guided filtering), ``curated-in-batch`` (the 20% dropped in-batch, not offline),
     ``curated-each`` (both filters at 80%: ~36%), ``curated-one-stage`` (no sDPO),
     ``curated-dpo`` (plain DPO, not the advised objective), ``curated-no-online`` (no online
     curation between the stages, training/online.py);

5. evaluation: ``training.evaluate.evaluate`` on one held-out set of the sorting evaluation
   task shared by all seeds and arms (prompts and clean pairs disjoint from every seed's
   training prompts); rows go to the seed catalog's ``evals`` table (model = arm name).

Budget: every arm of a seed makes the same number of optimizer steps, ``epochs`` passes
over the raw set at ``batch_size``. Arms that train on fewer pairs (the filtered ones) see
their pairs a little more often; staged arms split the steps over their stages in
proportion to stage size. Same batch size, learning rate, schedule and training seed for
all arms, so the raw-set arms also see the batches in the same order.

Modules, one job each: ``config`` (GymConfig), ``budget`` (step budgets), ``prepare``
(per-seed data, ingest, reference, score, curate; the held-out set), ``arms`` (the arm
registry and the training paths), ``measure`` (evaluation of a policy, filter quality,
summaries), ``runner`` (executor, workers, :func:`run_gym`), ``claims`` (claims per noise
level, each part's effect, the defaults it decides), ``report`` (tables, plots, GYM.md). A plain library: no Prefect, no SQL (catalog reads go through
:mod:`curation.reads`, writes through ``Catalog.replace_slice``).
"""

from training.gym.arms import ARM_DESCRIPTIONS, ARMS, Arm, ArmRun, check_arms, get_arm, register_arm
from training.gym.budget import batches, budget_steps, epochs_for_steps, split_steps
from training.gym.claims import PARTS, Claim, Decision, Effect, decide_defaults, evaluate_claims, part_effects
from training.gym.config import GymConfig, with_overrides
from training.gym.measure import TABLE_METRICS, evaluate_policy, filter_quality, has_filler, summarise
from training.gym.prepare import CURATIONS, SeedData, Variant, build_heldout, prepare_seed
from training.gym.report import (
    NOTES_MARKER,
    PLOT_METRICS,
    decisions_table,
    effects_table,
    filter_table,
    markdown_table,
    per_seed_table,
    plot_results,
    render_report,
    write_report,
)
from training.gym.runner import GymResult, clear_previous, run_gym, train_arm

__all__ = [
    "ARMS",
    "ARM_DESCRIPTIONS",
    "CURATIONS",
    "PARTS",
    "Decision",
    "Effect",
    "Variant",
    "decide_defaults",
    "decisions_table",
    "effects_table",
    "part_effects",
    "NOTES_MARKER",
    "PLOT_METRICS",
    "TABLE_METRICS",
    "Arm",
    "ArmRun",
    "Claim",
    "GymConfig",
    "GymResult",
    "SeedData",
    "batches",
    "budget_steps",
    "build_heldout",
    "check_arms",
    "clear_previous",
    "epochs_for_steps",
    "evaluate_claims",
    "evaluate_policy",
    "filter_quality",
    "filter_table",
    "get_arm",
    "has_filler",
    "markdown_table",
    "per_seed_table",
    "plot_results",
    "prepare_seed",
    "register_arm",
    "render_report",
    "run_gym",
    "split_steps",
    "summarise",
    "train_arm",
    "with_overrides",
    "write_report",
]
