"""The three-way part of `KubeClient.apply`: which fields a re-apply deletes, and when an
object already is as desired."""

from __future__ import annotations

from llmos_operator.kube import _merge_removals, contains, holds_any, removals


def test_removals_name_only_what_the_last_apply_wrote_and_this_one_drops() -> None:
    last = {
        "metadata": {"labels": {"a": "1", "b": "2"}},
        "spec": {"replicas": 2, "template": {"spec": {"nodeSelector": {"pool": "gpu"}}}},
    }
    desired = {
        "metadata": {"labels": {"a": "1"}},
        "spec": {"replicas": 3, "template": {"spec": {}}},
    }
    assert removals(last, desired) == {
        "metadata": {"labels": {"b": None}},
        "spec": {"template": {"spec": {"nodeSelector": None}}},
    }
    assert removals({}, desired) == {}  # nothing applied before (or no record): nothing removed
    # lists are replaced whole by a merge patch: a shorter list needs no removal
    assert removals({"spec": {"ports": [1, 2]}}, {"spec": {"ports": [1]}}) == {}
    # a mapping that became a scalar is simply overwritten
    assert removals({"spec": {"x": {"y": 1}}}, {"spec": {"x": 5}}) == {}


def test_drift_check_and_patch_body() -> None:
    existing = {
        "metadata": {"annotations": {"other/x": "1"}},
        "spec": {"replicas": 2, "template": {"spec": {"nodeSelector": {"pool": "gpu"}}}},
    }
    owned = {"spec": {"replicas": 2, "template": {"spec": {}}}}
    dropped = removals({"spec": {"template": {"spec": {"nodeSelector": {}}}}}, owned)
    assert contains(existing, owned)  # what merge-patch semantics alone would call unchanged
    assert holds_any(existing, dropped)  # but the dropped field is still there
    assert not holds_any({"spec": {"template": {"spec": {}}}}, dropped)
    assert not holds_any(existing, {"metadata": {"labels": None}})  # absent: nothing to remove
    assert _merge_removals(owned, dropped) == {
        "spec": {"replicas": 2, "template": {"spec": {"nodeSelector": None}}}
    }
