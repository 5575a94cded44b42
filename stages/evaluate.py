"""Stage evaluate: test-split Recall@K / NDCG@K of TIGER and of the popularity baseline -> metrics/<dataset>.json."""

import json

from rastp import config
from rastp.cli import run_stage
from rastp.data import load_prepared
from rastp.evaluation import evaluate_tiger
from rastp.io import read_npy, write_json


def main(argv):
    cfg, paths = config.load(argv)
    ev = cfg.evaluate
    metrics = evaluate_tiger(paths.model() / "tiger.pt", load_prepared(paths.prepared()).sequences,
                             read_npy(paths.sids() / "sids.npy"), max_history=int(cfg.tiger.max_history),
                             beam_size=int(ev.beam_size), batch_size=int(ev.batch_size), ks=list(ev.ks),
                             exclude_seen=bool(ev.exclude_seen), exact=bool(ev.exact), seed=int(cfg.seed))
    write_json(paths.metrics(), metrics)
    print(f"[evaluate] {paths.dataset}: {json.dumps(metrics)}")


if __name__ == "__main__":
    run_stage(main)
