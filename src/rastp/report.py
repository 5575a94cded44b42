"""Mean +- std over seeds, per dataset, from DVC experiments.

    dvc exp run --queue -S seed=1 && dvc exp run --queue -S seed=2 && dvc exp run --queue -S seed=3
    dvc queue start && dvc queue status      # wait until they are done
    python -m rastp.report                   # reads `dvc exp show --json`

Runs (the baseline commit and its experiments) whose params differ only in `seed` form one
group; each group gets a table: dataset x model x metric, mean +- sample std over its seeds.
`--json PATH` also writes the numbers, each run's value included.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from typing import Iterable

from rastp.io import write_json

METRICS_FILE = re.compile(r"^metrics/([^/]+)\.json$")  # metrics/<dataset>.json (not the per-stage reports)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def runs_from_exp_show(exp_show: list[dict]) -> list[dict]:
    """`dvc exp show --json` -> [{name, params (flat), metrics: {dataset: {metric: value}}}], workspace excluded."""
    entries = []
    for commit in exp_show:
        if commit.get("rev") == "workspace":
            continue
        entries.append(commit)
        for experiment in commit.get("experiments") or []:
            entries.extend(experiment.get("revs") or [])
    runs = []
    for entry in entries:
        data = entry.get("data") or {}
        params = _flatten((data.get("params") or {}).get("params.yaml", {}).get("data", {}))
        metrics = {}
        for path, content in (data.get("metrics") or {}).items():
            match = METRICS_FILE.match(path)
            if match and "data" in content:
                metrics[match.group(1)] = _flatten(content["data"])
        if metrics:
            runs.append({"name": entry.get("name") or entry.get("rev", "")[:7], "params": params, "metrics": metrics})
    return runs


def seed_groups(runs: Iterable[dict]) -> list[dict]:
    """Group runs whose params are equal but for `seed`; mean and std of every numeric metric per dataset."""
    groups = defaultdict(list)
    for run in runs:
        key = json.dumps({k: v for k, v in run["params"].items() if k != "seed"}, sort_keys=True, default=str)
        groups[key].append(run)
    summaries = []
    for members in groups.values():
        values = defaultdict(dict)  # (dataset, metric) -> {run name: value}
        for run in members:
            for dataset, metrics in run["metrics"].items():
                for name, value in metrics.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        values[(dataset, name)][run["name"]] = float(value)
        summaries.append({
            "runs": [run["name"] for run in members],
            "seeds": [run["params"].get("seed") for run in members],
            # Each run's own value beside the mean, so that a seed's figure can be quoted from the file.
            "metrics": {f"{dataset}/{name}": {"mean": statistics.fmean(v.values()),
                                              "std": statistics.stdev(v.values()) if len(v) > 1 else 0.0,
                                              "n": len(v), "values": v}
                        for (dataset, name), v in sorted(values.items())},
        })
    return sorted(summaries, key=lambda s: -len(s["runs"]))


def markdown(summary: dict) -> str:
    lines = [f"runs: {', '.join(summary['runs'])} (seeds {summary['seeds']})", "",
             "| dataset | metric | mean ± std | n |", "|---|---|---|---|"]
    for key, stat in summary["metrics"].items():
        dataset, name = key.split("/", 1)
        if name in ("users", "short_lists") or name.startswith("standard_error."):  # spread over seeds instead
            continue
        lines.append(f"| {dataset} | {name} | {stat['mean']:.4f} ± {stat['std']:.4f} | {stat['n']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp-show", help="a saved `dvc exp show --json` (default: run it)")
    parser.add_argument("--json", help="also write the summaries to this file")
    args = parser.parse_args(argv)
    if args.exp_show:
        with open(args.exp_show) as f:
            exp_show = json.load(f)
    else:
        done = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"error: dvc exp show failed: {done.stderr.strip()}")
        exp_show = json.loads(done.stdout)
    summaries = seed_groups(runs_from_exp_show(exp_show))
    if not summaries:
        sys.exit("error: no experiment with metrics/<dataset>.json found (run `dvc exp run` first)")
    print("\n\n".join(markdown(s) for s in summaries))
    if args.json:
        write_json(args.json, summaries)


if __name__ == "__main__":
    main()
