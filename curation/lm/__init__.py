"""The language-model pieces that curation and training both need: the bottom layer.

Why this package exists: curation scores pairs with the reference model (token lengths,
truncation flags, reference log-probs) and training reuses exactly those numbers instead of
running the reference model again, so both sides must tokenise, load models and compute
log-probs with the same code. That code lives here, below both of them, so that the layers
point one way (flows -> training -> curation -> curation.lm) and curation never depends on
the training package:

* :mod:`curation.lm.tokenization`: pairs tokenised exactly as TRL's ``DPOTrainer`` does;
* :mod:`curation.lm.logprobs`: reference log-probs equal to TRL's precompute pass, fast;
* :mod:`curation.lm.packed_attention`: the per-row attention of the packed layout;
* :mod:`curation.lm.loading`: models and tokenizers from a local path or the hub, devices
  and CPU threads;
* :mod:`curation.lm.hub`: is the Hugging Face hub there, and loading hub datasets
  from the local cache when it is not.

Nothing here imports other curation modules except :mod:`curation.errors` and
:mod:`curation.env` (tests/test_layers.py checks it), and nothing changes global state that
outlives a call.
"""
