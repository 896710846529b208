"""Phase announcements: numbered in start order, ETA from the last run with the same setup."""
import io

from workbench.phases import Phases


def test_phases_number_in_start_order_and_learn_their_eta(tmp_path):
    history = tmp_path / "phase_times.json"
    out = io.StringIO()
    first = Phases(["model load", "training", "core"], history, "setup-a", stream=out)
    with first("training"):
        pass
    with first("model load"):
        pass
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/3] training: started (first run with this setup: no ETA yet)")
    assert lines[2].startswith("[2/3] model load: started")
    assert lines[1].startswith("[1/3] training: done in")
    out2 = io.StringIO()
    again = Phases(["training"], history, "setup-a", stream=out2)
    assert abs(again.eta("training") - first.took["training"]) < 0.1
    with again("training"):
        pass
    assert "ETA ~0 s (the last run with this setup)" in out2.getvalue()
    other = Phases(["training"], history, "setup-b", stream=io.StringIO())
    assert other.eta("training") is None  # another setup has no history yet


def test_a_torn_history_only_costs_the_eta(tmp_path):
    history = tmp_path / "phase_times.json"
    history.write_text("{not json")
    p = Phases(["core"], history, "k", stream=io.StringIO())
    assert p.eta("core") is None
    with p("core"):
        pass
    assert p.eta("core") is not None  # rewritten whole
