"""torchrun's SIGTERM under torchrun: raised as `Stopped` so the rank reports one line, but never while the
rank is already reporting (the CI failure: gloo's "Connection reset by peer" was being handled when the
SIGTERM landed, and the second exception replaced rank 0's report with a traceback)."""
import signal

import pytest

from workbench import distributed


@pytest.fixture
def under_torchrun(monkeypatch):
    monkeypatch.setattr(distributed, "_CTX", distributed.Context(rank=0, world=2, data_parallel=True))
    monkeypatch.setattr(distributed, "_reporting", False)


def collective_error() -> RuntimeError:
    """An error raised from inside torch.distributed, as gloo raises a dead peer's reset connection."""
    import torch.distributed.distributed_c10d as c10d
    code = compile("raise RuntimeError('Read error: Connection reset by peer')", c10d.__file__, "exec")
    try:
        exec(code)
    except RuntimeError as e:
        return e


def test_a_sigterm_in_the_middle_of_training_raises_stopped_once(under_torchrun):
    with pytest.raises(distributed.Stopped):
        distributed._stopped(signal.SIGTERM, None)
    distributed._stopped(signal.SIGTERM, None)  # the report that follows is not cut short by a second one


def test_a_sigterm_while_a_collective_error_is_handled_is_ignored(under_torchrun):
    error = collective_error()
    assert distributed.from_collective(error)
    try:
        raise error
    except RuntimeError:
        distributed._stopped(signal.SIGTERM, None)  # returns: the handler below goes on to report
    with pytest.raises(distributed.Stopped):  # and once that exception is gone, SIGTERM stops the rank again
        distributed._stopped(signal.SIGTERM, None)


def test_a_sigterm_while_another_error_is_handled_still_stops_the_rank(under_torchrun):
    try:
        raise ValueError("not from a collective")
    except ValueError:
        with pytest.raises(distributed.Stopped):
            distributed._stopped(signal.SIGTERM, None)


def test_once_reporting_a_sigterm_is_ignored(under_torchrun):
    distributed.reporting()
    distributed._stopped(signal.SIGTERM, None)
