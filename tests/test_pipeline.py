"""End to end: the real DVC pipeline on a tiny dataset, and the DVC behaviour users rely on."""

from __future__ import annotations

import json
import math
import re
import sys

import numpy as np
import pytest

from conftest import run, set_params

pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]
ALL_STAGES = {"fetch_ml100k", "prepare@tiny", "embed@tiny", "codebook@tiny", "sids@tiny", "train@tiny", "evaluate@tiny"}


def repro(repo) -> set[str]:
    """Run `dvc repro`; the set of stages it actually ran."""
    out = run(DVC + ["repro"], repo).stdout
    return set(re.findall(r"Running stage '([^']+)'", out))


def restore(repo) -> None:
    """Back to the last commit. The index is rebuilt from HEAD and every file written from it: `git checkout -- .`
    trusts the index's stat data, which a same-size edit (lr: 0.001 -> 0.002) could leave looking clean."""
    run(["git", "read-tree", "HEAD"], repo)
    run(["git", "checkout-index", "--all", "--force"], repo)
    run(DVC + ["checkout", "-q", "--force"], repo)


@pytest.fixture(scope="module")
def built(pipeline_repo):
    ran = repro(pipeline_repo)
    run(["git", "add", "-A"], pipeline_repo)
    run(["git", "commit", "-qm", "first repro"], pipeline_repo)
    return pipeline_repo, ran


def test_fresh_clone_repro_runs_every_stage_and_writes_metrics(built):
    repo, ran = built
    assert ran == ALL_STAGES
    metrics = json.loads((repo / "metrics/tiny.json").read_text())
    for model in ("tiger", "popularity"):
        m = metrics[model]
        assert set(m) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
        assert 0 <= m["ndcg@5"] <= m["recall@5"] <= m["recall@10"] <= 1
        assert m["ndcg@5"] <= m["ndcg@10"] <= m["recall@10"]
    assert metrics["users"] == 30
    errors = metrics["standard_error"]
    assert set(errors) == {"tiger", "popularity", "tiger_minus_popularity"}
    for model in ("tiger", "popularity"):  # a 0/1 mean's standard error is sqrt(p (1 - p) / (n - 1))
        p = metrics[model]["recall@10"]
        assert errors[model]["recall@10"] == pytest.approx(math.sqrt(p * (1 - p) / 29), abs=1e-5)
    codebook = json.loads((repo / "metrics/codebook/tiny.json").read_text())
    assert len(codebook["usage"]) == 2 and 0 < codebook["unique_fraction"] <= 1
    # training curves for `dvc plots`: one row per logged step
    curves = list((repo / "metrics/train/tiny/plots/metrics").rglob("*.tsv"))
    assert any("ndcg" in p.name for p in curves)
    # The train metrics name the model saved, the best validation's, beside DVCLive's last values.
    validations = (repo / "metrics/train/tiny/plots/metrics/val/ndcg@10.tsv").read_text().splitlines()[1:]
    saved = json.loads((repo / "metrics/train/tiny/metrics.json").read_text())["saved_model"]
    assert saved["val"]["ndcg@10"] == pytest.approx(max(float(line.split("\t")[-1]) for line in validations))
    assert len(validations) == 3 and saved["step"] > 0 and set(saved["val"]) == {"loss", "recall@10", "ndcg@10"}
    assert "metrics/tiny.json" in run(DVC + ["metrics", "show"], repo).stdout


def test_second_repro_does_nothing(built):
    repo, _ = built
    assert repro(repo) == set()
    assert "up to date" in run(DVC + ["status"], repo).stdout


def test_tiger_param_reruns_only_train_and_evaluate(built):
    repo, _ = built
    set_params(repo / "params.yaml", {"tiger.dropout": 0.2})
    try:
        assert repro(repo) == {"train@tiny", "evaluate@tiny"}
    finally:
        restore(repo)


def test_codebook_param_reruns_codebook_and_everything_after(built):
    repo, _ = built
    set_params(repo / "params.yaml", {"codebook.lr": 0.002})
    try:
        assert repro(repo) == {"codebook@tiny", "sids@tiny", "train@tiny", "evaluate@tiny"}
    finally:
        restore(repo)


def listed_experiments(exp_show: list[dict]) -> dict[str, dict]:
    """Experiments of `dvc exp show --json` by name -> their data (params, metrics)."""
    return {rev.get("name"): rev.get("data") or {} for commit in exp_show for exp in commit.get("experiments") or []
            for rev in exp.get("revs") or []}


def test_exp_run_with_seed_is_listed_and_diffed(built):
    repo, _ = built
    try:
        out = run(DVC + ["exp", "run", "--name", "seed-2025", "-S", "seed=2025"], repo).stdout
        assert "Ran experiment" in out
        shown = json.loads(run(DVC + ["exp", "show", "--json"], repo).stdout)
        experiments = listed_experiments(shown)
        # On failure, say what DVC and git hold (this once failed on a CI machine only).
        context = (f"exp show: {json.dumps(shown)[:3000]}\nexp list -A: {run(DVC + ['exp', 'list', '-A'], repo).stdout}"
                   f"\nrefs: {run(['git', 'for-each-ref'], repo).stdout}\nexp run: {out[-2000:]}")
        assert "seed-2025" in experiments, context
        data = experiments["seed-2025"]
        assert data["params"]["params.yaml"]["data"]["seed"] == 2025, context
        assert "ndcg@10" in data["metrics"]["metrics/tiny.json"]["data"]["tiger"], context
        diff = json.loads(run(DVC + ["metrics", "diff", "--json", "--all"], repo).stdout)
        assert "metrics/tiny.json" in diff and "tiger.ndcg@10" in diff["metrics/tiny.json"]
        # the seed table: the baseline (seed 42) and the experiment differ only in their seed
        table = run([sys.executable, "-m", "rastp.report"], repo).stdout
        assert re.search(r"seeds \[(42, 2025|2025, 42)\]", table), f"{table}\n{context}"
        assert re.search(r"\| tiny \| tiger.ndcg@10 \| \d\.\d{4} ± \d\.\d{4} \| 2 \|", table)
    finally:
        restore(repo)


def test_hand_run_with_overrides_leaves_dvc_outputs_alone(built):
    """Two hand runs of the evaluate stage, each in its own runs/ folder: a beam as wide as the catalogue (exact) and
    the exact search from a beam of 1, which must score the same."""
    repo, _ = built
    before = (repo / "metrics/tiny.json").read_text()
    num_items = len(np.load(repo / "data/sids/tiny/sids.npy"))
    done = run([sys.executable, "stages/evaluate.py", "dataset=tiny", f"evaluate.beam_size={num_items}"], repo)
    assert "runs/tiny-" in done.stderr
    run([sys.executable, "stages/evaluate.py", "dataset=tiny", "evaluate.beam_size=1", "evaluate.exact=true"], repo)
    written = [json.loads(path.read_text()) for path in (repo / "runs").glob("tiny-*/metrics/tiny.json")]
    assert sorted(metrics["search"] for metrics in written) == ["beam", "exact"]
    assert written[0]["tiger"] == written[1]["tiger"] and written[0]["short_lists"] == written[1]["short_lists"] == 0
    exact = next(metrics for metrics in written if metrics["search"] == "exact")
    assert exact["beam_lists_exact"] == 0  # a beam of 1 lists one item, scored beside the exact lists
    assert set(exact["tiger_beam"]) == set(exact["tiger"]) == set(exact["standard_error"]["exact_minus_beam"])
    assert (repo / "metrics/tiny.json").read_text() == before
    assert "dvc" not in run(["git", "status", "--porcelain", "dvc.lock"], repo).stdout


def test_push_fresh_clone_pull_repro_gives_the_same_metrics(built, tmp_path):
    repo, _ = built
    run(DVC + ["remote", "add", "-d", "-f", "storage", str(tmp_path / "remote")], repo)
    run(["git", "commit", "-qam", "a local remote"], repo)
    run(DVC + ["push", "-q"], repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "data/raw/tiny").exists()  # raw data comes from the remote, not from git
    run(DVC + ["pull", "-q"], clone)
    assert (clone / "data/raw/tiny/ml-100k.inter").read_bytes() == (repo / "data/raw/tiny/ml-100k.inter").read_bytes()
    assert repro(clone) == set()
    run(DVC + ["repro", "-q", "--force", "--single-item", "evaluate@tiny"], clone)
    assert (clone / "metrics/tiny.json").read_text() == (repo / "metrics/tiny.json").read_text()
