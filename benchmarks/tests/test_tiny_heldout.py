"""benchmarks/tiny/heldout.py's bookkeeping of earlier figures (the measurements themselves run in
tests/test_tiny.py, against the shipped model)."""

from benchmarks.tiny.heldout import earlier_figures


def test_heldout_keeps_earlier_labels_and_replaces_a_remeasurement():
    old = {"label": "after parts 1-2", "demo": 5.0, "earlier": {"after part 1": {"label": "after part 1"}}}
    assert earlier_figures(old, "after parts 1-3") == {
        "after part 1": {"label": "after part 1"}, "after parts 1-2": {"label": "after parts 1-2", "demo": 5.0}}
    assert earlier_figures(old, "after parts 1-2") == {"after part 1": {"label": "after part 1"}}
    assert "earlier" in old  # the input is left as it was
