"""Stage sids: codes -> semantic IDs (L codes + a de-duplication level), one distinct SID per item."""

import numpy as np

from rastp import config
from rastp.cli import run_stage
from rastp.io import atomic_path, read_npy, write_json
from rastp.sids import assign_sids, sid_report


def main(argv):
    cfg, paths = config.load(argv)
    codes_path = paths.codebook() / "codes.npy"
    codes = read_npy(codes_path)
    sids = assign_sids(codes, int(cfg.sids.dedup_size), source=str(codes_path))
    codebook_size = int(cfg.codebook_size[paths.dataset])
    with atomic_path(paths.sids(write=True), directory=True) as tmp:
        np.save(tmp / "sids.npy", sids)
        write_json(tmp / "levels.json", {"level_sizes": [codebook_size] * codes.shape[1] + [int(cfg.sids.dedup_size)]})
    report = sid_report(codes, sids)
    write_json(paths.metrics("sids"), report)
    print(f"[sids] {paths.dataset}: {report}")


if __name__ == "__main__":
    run_stage(main)
