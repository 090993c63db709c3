"""The default model's name and recipe, importable without torch (the CLI and configs read them)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "winnow-tiny"


@dataclass
class TinyModelConfig:
    """Shape and warm-up recipe of the default "winnow-tiny" model.

    Defaults are tuned for the synthetic sorting demo: numbers become single BPE tokens, so sorting
    is a copy-the-next-smallest-token task that a 2-layer model learns in a few hundred steps. On
    ~3000 pairs (2 CPU cores, one thread) the warm-up takes ~17-20 s; greedy decoding then sorts
    ~98% of held-out lists exactly when the responses are correct, ~85% when they are the demo's
    noisy "chosen" side. Wider (192) or deeper (3) models were no better at this step budget but
    cost 1.5-2x per step; more steps or a higher lr start imitating the noise in noisy responses.
    """

    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    sft_steps: int = 600
    sft_batch_size: int = 32
    sft_lr: float = 1e-3
    sft_warmup_frac: float = 0.1
    sft_weight_decay: float = 0.01
    seed: int = 0
