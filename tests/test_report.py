"""The seed table: runs that differ only in `seed` are averaged, per dataset."""

import pytest

from rastp.report import markdown, runs_from_exp_show, seed_groups


def entry(name, seed, lr, ndcg):
    return {"rev": name, "name": name, "data": {
        "params": {"params.yaml": {"data": {"seed": seed, "train": {"lr": lr}}}},
        "metrics": {"metrics/ml100k.json": {"data": {"tiger": {"ndcg@10": ndcg}, "users": 943,
                                                             "standard_error": {"tiger": {"ndcg@10": 0.003}}}},
                    "metrics/codebook/ml100k.json": {"data": {"recon_mse": 0.1}}}}}


EXP_SHOW = [
    {"rev": "workspace", **entry("workspace", 7, 0.001, 0.9)},
    {**entry("main", 1, 0.001, 0.020), "experiments": [
        {"revs": [entry("exp-a", 2, 0.001, 0.030)]},
        {"revs": [entry("exp-b", 3, 0.001, 0.040)]},
        {"revs": [entry("exp-lr", 1, 0.002, 0.050)]},
    ]},
]


def test_runs_differing_only_in_seed_are_averaged():
    runs = runs_from_exp_show(EXP_SHOW)
    assert [r["name"] for r in runs] == ["main", "exp-a", "exp-b", "exp-lr"]  # not the workspace
    assert set(runs[0]["metrics"]) == {"ml100k"}  # the per-stage reports are not recommendation metrics
    seeds, other = seed_groups(runs)
    assert seeds["seeds"] == [1, 2, 3] and other["runs"] == ["exp-lr"]
    stat = seeds["metrics"]["ml100k/tiger.ndcg@10"]
    assert stat["mean"] == pytest.approx(0.03) and stat["std"] == pytest.approx(0.01) and stat["n"] == 3
    assert stat["values"] == {"main": 0.020, "exp-a": 0.030, "exp-b": 0.040}  # each run's own, by name
    assert "| ml100k | tiger.ndcg@10 | 0.0300 ± 0.0100 | 3 |" in markdown(seeds)
    assert "users" not in markdown(seeds) and "standard_error" not in markdown(seeds)
