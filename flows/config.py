"""One typed configuration for every flow, loadable from a YAML recipe.

The sections reuse the libraries' own dataclasses (pydantic validates them), so a setting is
declared once, where the code that uses it lives. Precedence: defaults < recipe < flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from curation.decide import CurateConfig
from curation.errors import WinnowError
from curation.ingest import IngestOptions
from curation.paths import InvalidRunIdError, check_run_id
from curation.score.scoring import ScoreOptions
from training.config import TrainConfig
from training.tiny_config import TinyModelConfig

DEMO_SOURCE = str(Path(__file__).resolve().parents[1] / "data" / "demo" / "pairs.jsonl")
DEMO_RECIPE = Path(__file__).resolve().parent / "recipes" / "demo.yaml"
TaskRunnerName = Literal["threads", "processes", "dask", "ray"]


class EvalConfig(BaseModel):
    """Held-out evaluation after training (see training/evaluate/ and training/eval_tasks/)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Evaluate the final policy against its reference after training.")
    prompts: int = Field(200, description="At most this many prompts sampled from each model.")
    heldout_pairs: int = Field(300, description="At most this many pairs scored (implicit reward, drift).")
    max_new_tokens: int = Field(24, description="Tokens per sampled response.")
    seed: int = Field(1234, description="Seed of the samples and of the prompt/pair draw.")
    task: str = Field("pairs", description="Evaluation task by name (training/eval_tasks): pairs (user data: the "
                                           "prompts curation held out) or sorting (the demo).")
    reward_model: str | None = Field(None, description="An AutoModelForSequenceClassification folder (or hub id) "
                                                       "that judges policy and reference samples: mean reward "
                                                       "of each and the policy's win rate.")


class PipelineConfig(BaseModel):
    """Parameters of `curate`, `train` and `curate-and-train`."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    sources: list[str] = Field(default_factory=lambda: [DEMO_SOURCE])
    workdir: str = "runs"
    run_id: str | None = None
    model: str = "winnow-tiny"  # the default local model, or any path / hub id
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)  # shape and warm-up of winnow-tiny
    ingest: IngestOptions = Field(default_factory=IngestOptions)
    score: ScoreOptions = Field(default_factory=ScoreOptions)
    score_shards: int = 2  # scoring tasks; a Dask/Ray runner spreads them over workers
    curate: CurateConfig = Field(default_factory=CurateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    task_runner: TaskRunnerName = "threads"
    refresh: bool = False

    @field_validator("run_id")
    @classmethod
    def _run_id_is_a_folder_name(cls, value: str | None) -> str | None:
        """A run id names a folder under the workdir: the one pattern of curation.paths."""
        if value is None:
            return value
        try:
            return check_run_id(value)
        except InvalidRunIdError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
        """Defaults < the recipe at `path` < `overrides` (dotted keys).

        With no recipe and no `sources` override the run is the bundled demo, so the demo recipe
        (flows/recipes/demo.yaml) is the recipe: its settings come with its data, the sorting
        evaluation task among them.
        """
        if path is None and "sources" not in (overrides or {}):
            path = DEMO_RECIPE
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise WinnowError(f"recipe {path} not found")
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise WinnowError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
            if not isinstance(data, dict):
                raise WinnowError(f"recipe {path} must be a mapping of settings")
        merged = _deep_merge(cls().dump(), data)  # a partial section keeps the other defaults
        for dotted, value in (overrides or {}).items():
            _set_dotted(merged, dotted, value)
        try:
            config = cls.model_validate(merged)
        except (ValidationError, WinnowError, ValueError, TypeError) as exc:
            raise WinnowError(f"invalid settings: {_first_error(exc)}") from None
        return config

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise WinnowError(f"cannot set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}"
    return str(exc).splitlines()[0]


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """`--set train.learning_rate=1e-4` pairs; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise WinnowError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(raw)
    return out
