"""Which task failures Prefect retries: transient ones (network, a busy catalog), never a user's bad input."""

from __future__ import annotations

import pytest
from prefect.states import Completed, Failed

from curation.manifest import ShardIntegrityError
from curation.store import CatalogBusyError
from flows.caching import is_transient, retry_on_transient


@pytest.mark.parametrize(("exc", "retry"), [
    (ConnectionError("reset by peer"), True),
    (TimeoutError(), True),
    (BrokenPipeError(), True),
    (CatalogBusyError("the catalog is busy"), True),
    (OSError("Could not set lock on file catalog.duckdb: Conflicting lock is held"), True),
    (ShardIntegrityError("shard stage-1.parquet does not match its sha256"), False),
    (ValueError("bad value"), False),
    (None, False),
])
def test_is_transient(exc: BaseException | None, retry: bool) -> None:
    assert is_transient(exc) is retry


def test_retry_condition_reads_the_failed_state() -> None:
    """Prefect calls it with the failed state; an exception inside it would be logged and the retry lost."""
    assert retry_on_transient(None, None, Failed(data=ConnectionError("reset"))) is True
    assert retry_on_transient(None, None, Failed(data=ShardIntegrityError("changed after curation"))) is False
    assert retry_on_transient(None, None, Completed(data=1)) is False
