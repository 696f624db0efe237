"""PodDisruptionBudgets: Deployment mode only, and never one that blocks every eviction."""

from __future__ import annotations

import pytest

from ._chart import PROFILES


def _pdb(m, suffix):
    pdb = m.find("PodDisruptionBudget", suffix)
    return None if pdb is None else pdb["spec"]["minAvailable"]


def test_default_budgets_leave_room_for_one_eviction(profile):
    m = profile("default")
    assert _pdb(m, "-proxy") == 2  # of 3 replicas
    assert _pdb(m, "-waf") == 1  # of 2 replicas


@pytest.mark.parametrize(
    "replicas,min_available,expected",
    [(2, 2, 1), (3, 5, 2), (4, 3, 3), (3, "100%", 2), (4, "50%", "50%"), (3, 0, 0)],
)
def test_min_available_is_capped_below_replicas(render, replicas, min_available, expected):
    m = render(
        values={
            "proxy": {"replicaCount": replicas},
            "podDisruptionBudget": {"proxy": {"minAvailable": min_available}},
        }
    )
    assert _pdb(m, "-proxy") == expected


def test_waf_budget_is_capped_too(render):
    m = render(
        values={"waf": {"replicaCount": 2}, "podDisruptionBudget": {"waf": {"minAvailable": 2}}}
    )
    assert _pdb(m, "-waf") == 1


def test_single_replica_gets_no_budget(render):
    m = render(values={"proxy": {"replicaCount": 1}, "waf": {"replicaCount": 1}})
    assert m.all("PodDisruptionBudget") == []


def test_daemonset_mode_has_no_budgets(render):
    for ports in ({"useHostPorts": True}, {"useHostPorts": False}):
        m = render(values={"proxy": {"kind": "daemonset", "ports": ports}})
        assert m.all("PodDisruptionBudget") == [], ports


def test_budgets_can_be_disabled(render):
    assert (
        render(values={"podDisruptionBudget": {"enabled": False}}).all("PodDisruptionBudget") == []
    )


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_no_profile_renders_a_budget_blocking_all_evictions(profile, name):
    m = profile(name)
    workloads = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: d
        for d in m.all("Deployment")
    }
    for pdb in m.all("PodDisruptionBudget"):
        target = workloads[pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]]
        assert (
            target["spec"]["template"]["metadata"]["labels"].items()
            >= pdb["spec"]["selector"]["matchLabels"].items()
        )
        min_available = pdb["spec"]["minAvailable"]
        if isinstance(min_available, int):
            assert min_available < target["spec"]["replicas"], pdb["metadata"]["name"]
        else:
            assert int(min_available.rstrip("%")) < 100
