"""Selecting what `rfclip-backend preannotate` predicts (the runs themselves are in the e2e test)."""
import pytest

from backend.jobs.preannotate import needs_prediction
from backend.jobs.studio import StudioTask, parse_selection


def test_task_selection_parses_ids_and_ranges():
    assert parse_selection("all") is None and parse_selection("unpredicted") is None
    assert parse_selection("1,2,5-9") == [1, 2, 5, 6, 7, 8, 9]
    for bad in ("x", "5-2", "", "1-10000000"):
        with pytest.raises(ValueError, match="--tasks"):
            parse_selection(bad, limit=1000)


@pytest.mark.parametrize("versions,mode,expected", [
    ((), "unpredicted", True),
    (("v1",), "unpredicted", False),  # another version's prediction: not "unpredicted"
    (("v2",), "unpredicted", False),  # this version's: done already
    (("v1",), "all", True),
    (("v1", "v2"), "all", False),
    (("v2",), "ids", False),
    ((), "ids", True),
])
def test_a_task_with_this_versions_prediction_is_never_predicted_again(versions, mode, expected):
    assert needs_prediction(StudioTask(1, {}, frozenset(versions)), "v2", mode) is expected
