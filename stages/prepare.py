"""Stage prepare: raw files -> data/prepared/<dataset>/ (dense ids, item texts, chronological sequences)."""

import json

from rastp import config
from rastp.cli import run_stage
from rastp.data import read_raw, write_prepared


def main(argv):
    cfg, paths = config.load(argv)
    data_cfg = cfg.data[paths.dataset]
    stats = write_prepared(read_raw(data_cfg, paths.raw()), paths.prepared(write=True),
                           text_template=data_cfg.text_template, min_user_interactions=data_cfg.min_user_interactions)
    print(f"[prepare] {paths.dataset}: {json.dumps(stats)}")


if __name__ == "__main__":
    run_stage(main)
