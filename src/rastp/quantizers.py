"""Semantic-ID tokenizers: every method is one residual quantizer with a different encoder and training.

A `Tokenizer` standardises an item embedding, maps it to a latent with an encoder, and quantizes the
latent with L residual levels of K codes; the decoder maps the sum of the chosen codewords back.

    method     encoder/decoder   codebooks trained by                                    paper
    rqvae      MLP / MLP         gradient, straight-through (`rqvae.quantize: ste`)      TIGER (Rajput et al. 2023)
                                 or Gumbel-softmax relaxation (`rqvae.quantize: gumbel`)
    rvq        identity          gradient on the (standardised) embeddings               RVQ (Zeghidour et al. 2021)
    rqkmeans   identity          k-means per level on the residuals, no gradient         OneRec / GRID

They share the residual loop (`ResidualQuantizer`), the k-means(++) initialisation, the dead-code
reset, the balanced last level (Sinkhorn) and the quality report.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from rastp.config import ConfigError
from rastp.hardware import trainer_device
from rastp.io import DataError
from rastp.sids import collision_stats

METHODS = ("rqvae", "rqkmeans", "rvq")
QUANTIZE = ("ste", "gumbel")
SCHEDULES = ("exponential", "cosine", "linear")
LAST_LEVEL = ("nearest", "sinkhorn", "distinct")
# Balanced last level: Sinkhorn-Knopp on distances rescaled to [-1, 1] (LC-Rec uses 0.003 and 50 iterations,
# which stops short of balance; 0.01 and 100 reach it).
SINKHORN_EPSILON = 0.01
SINKHORN_ITERS = 100


# --------------------------------------------------------------------------- configuration

def param_name(key: str) -> str:
    """The params.yaml key behind a `codebook` setting: codes per level are set per dataset."""
    return "codebook_size.<dataset>" if key == "codebook_size" else f"codebook.{key}"


@dataclass(frozen=True)
class Settings:
    """The `codebook` params section, checked once before anything runs."""

    method: str
    input_dim: int
    levels: int
    codebook_size: int
    hidden_dims: tuple[int, ...]
    latent_dim: int
    beta: float
    quantize: str
    temperature: float
    min_temperature: float
    schedule: str
    update_every: int
    standardize: bool
    kmeans_init: bool
    kmeans_iters: int
    dead_code_steps: int
    last_level: str
    lr: float
    batch_size: int
    epochs: int

    @classmethod
    def parse(cls, cfg: Mapping) -> "Settings":
        def get(key: str, kind, check=None, why=""):
            node = cfg
            for part in key.split("."):
                if not isinstance(node, Mapping) or part not in node:
                    raise ConfigError(f"codebook.{key} is missing from the codebook params")
                node = node[part]
            ok = isinstance(node, kind) and not (kind is not bool and isinstance(node, bool))
            if kind is float and isinstance(node, int) and not isinstance(node, bool):
                node, ok = float(node), True
            if not ok or (check is not None and not check(node)):
                raise ConfigError(f"{param_name(key)} must be {why or kind.__name__}, got {node!r}")
            return node

        positive = (lambda v: v > 0), "a positive number"
        hidden = get("rqvae.hidden_dims", (list, tuple), lambda v: all(isinstance(h, int) and h > 0 for h in v),
                     "a list of positive integers")
        s = cls(
            method=get("method", str, lambda v: v in METHODS, f"one of {list(METHODS)}"),
            input_dim=get("input_dim", int, *positive),
            levels=get("levels", int, *positive),
            codebook_size=get("codebook_size", int, *positive),
            hidden_dims=tuple(hidden),
            latent_dim=get("rqvae.latent_dim", int, *positive),
            beta=get("rqvae.beta", float, lambda v: v >= 0, "a non-negative number"),
            quantize=get("rqvae.quantize", str, lambda v: v in QUANTIZE, f"one of {list(QUANTIZE)}"),
            temperature=get("gumbel.temperature", float, *positive),
            min_temperature=get("gumbel.min_temperature", float, *positive),
            schedule=get("gumbel.schedule", str, lambda v: v in SCHEDULES, f"one of {list(SCHEDULES)}"),
            update_every=get("gumbel.update_every", int, *positive),
            standardize=get("standardize", bool),
            kmeans_init=get("kmeans_init", bool),
            kmeans_iters=get("kmeans_iters", int, *positive),
            dead_code_steps=get("dead_code_steps", int, lambda v: v >= 0, "a non-negative integer"),
            last_level=get("last_level", str, lambda v: v in LAST_LEVEL, f"one of {list(LAST_LEVEL)}"),
            lr=get("lr", float, *positive),
            batch_size=get("batch_size", int, *positive),
            epochs=get("epochs", int, lambda v: v >= 0, "a non-negative integer"),
        )
        if s.min_temperature > s.temperature:
            raise ConfigError(f"codebook.gumbel.min_temperature ({s.min_temperature}) must not exceed "
                              f"codebook.gumbel.temperature ({s.temperature})")
        return s

    @property
    def neural(self) -> bool:
        return self.method == "rqvae"

    @property
    def gradient_mode(self) -> str:
        """How gradients reach the codebooks: RQ-VAE's estimator, or directly through the codewords (RVQ)."""
        return self.quantize if self.neural else "direct"


def check_inputs(embeddings: np.ndarray, s: Settings, source: str) -> None:
    """Every input problem, raised before any training or output."""
    if not isinstance(embeddings, np.ndarray) or embeddings.ndim != 2:
        raise DataError(f"{source}: expected a 2-d array [items, dim], got shape {np.shape(embeddings)}")
    if not np.issubdtype(embeddings.dtype, np.number):
        raise DataError(f"{source}: expected numbers, got dtype {embeddings.dtype}")
    n, dim = embeddings.shape
    if dim != s.input_dim:
        raise ConfigError(f"{source}: embeddings have width {dim} but codebook.input_dim is {s.input_dim}")
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DataError(f"{source}: {len(rows)} item(s) have non-finite embeddings (NaN/inf), first at row {rows[0]}")
    if n < s.codebook_size:
        raise ConfigError(f"{source}: {n} items are fewer than {param_name('codebook_size')}={s.codebook_size} "
                          f"codes per level; lower {param_name('codebook_size')}")


# --------------------------------------------------------------------------- k-means and code re-seeding

def squared_distances(x: torch.Tensor, codebook: torch.Tensor, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] squared Euclidean distances as one matmul (x_sq: x's squared norms, when reused)."""
    x_sq = x.pow(2).sum(1, keepdim=True) if x_sq is None else x_sq
    return (x_sq - 2 * x @ codebook.T + codebook.pow(2).sum(1)).clamp_min_(0)


def sample_far_points(x: torch.Tensor, nearest_d2: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n distinct rows of x drawn with probability proportional to the squared distance to their nearest code.

    The k-means++ rule: points the codebook serves worst are likeliest to become codes, and a point
    already on a code is (almost) never chosen.
    """
    weights = nearest_d2.double() + 1e-12  # uniform when every point sits on a code
    return x[torch.multinomial(weights, n, replacement=n > len(x), generator=generator)]


def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: k codes, each a row of x."""
    x_sq = x.pow(2).sum(1, keepdim=True)
    index = torch.empty(k, dtype=torch.long, device=x.device)
    index[0] = torch.randint(len(x), (1,), generator=generator, device=x.device)
    nearest = squared_distances(x, x[index[:1]], x_sq)[:, 0]
    for i in range(1, k):
        # Inverse-CDF draw, one point per step (cheaper than multinomial in this sequential loop).
        cdf = (nearest.double() + 1e-12).cumsum(0)
        u = torch.rand(1, generator=generator, device=x.device, dtype=torch.float64) * cdf[-1]
        index[i] = torch.searchsorted(cdf, u).clamp_max_(len(x) - 1)
        nearest = torch.minimum(nearest, squared_distances(x, x[index[i:i + 1]], x_sq)[:, 0])
    return x[index].clone()


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, list[float]]:
    """Lloyd's k-means from k-means++ seeds; an empty cluster is re-seeded like a dead code.

    Returns the centers and the inertia (mean squared distance to the nearest center) per iteration.
    """
    x_sq = x.pow(2).sum(1, keepdim=True)
    centers, assign, inertia = kmeans_pp(x, k, generator), None, []
    for _ in range(iters):
        nearest, new_assign = squared_distances(x, centers, x_sq).min(1)
        inertia.append(float(nearest.mean()))
        if assign is not None and torch.equal(new_assign, assign):
            break  # converged: the centers below would not move
        assign = new_assign
        counts = torch.bincount(assign, minlength=k)
        centers = torch.zeros_like(centers).index_add_(0, assign, x) / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = counts == 0
        if empty.any():
            centers[empty] = sample_far_points(x, nearest, int(empty.sum()), generator)
    return centers, inertia


def distinct_assign(d2: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Nearest codes, except that items sharing a prefix (their earlier levels' codes) get different codes.

    Each prefix group with a collision is re-assigned as a whole: the distinct codes of least total squared
    distance (the Hungarian method), a collision-free last level as in LC-Rec. A group larger than the codebook
    gets distinct codes for as many items as there are codes; the rest keep their nearest code.
    """
    from scipy.optimize import linear_sum_assignment

    codes = d2.argmin(1)
    group = torch.unique(prefix, dim=0, return_inverse=True)[1] if prefix.shape[1] else torch.zeros_like(codes)
    pair_count = torch.unique(group * d2.shape[1] + codes, return_inverse=True, return_counts=True)
    colliding = torch.unique(group[pair_count[2][pair_count[1]] > 1])
    order = torch.argsort(group, stable=True)
    starts = torch.searchsorted(group[order], torch.stack([colliding, colliding + 1]))
    for start, end in starts.T.tolist():
        members = order[start:end]
        rows, cols = linear_sum_assignment(d2[members].double().cpu().numpy())
        codes[members[torch.as_tensor(rows)]] = torch.as_tensor(cols, device=codes.device)
    return codes


def sinkhorn_assign(d2: torch.Tensor) -> torch.Tensor:
    """Balanced assignment: argmax of the entropic optimal transport plan with uniform code marginals.

    Spreads items evenly over the codes, so items that would all pick one code (a collision on the
    last level) are split. Log-domain iterations stay finite at LC-Rec's small epsilon.
    """
    lo, hi = d2.min(), d2.max()
    d = (d2 - (hi + lo) / 2) / ((hi - lo) / 2).clamp_min(1e-12)
    log_plan = -d.double() / SINKHORN_EPSILON
    n, k = log_plan.shape
    for _ in range(SINKHORN_ITERS):
        log_plan = log_plan - torch.logsumexp(log_plan, 0, keepdim=True) - math.log(k)  # each code gets 1/K
        log_plan = log_plan - torch.logsumexp(log_plan, 1, keepdim=True) - math.log(n)  # each item gives 1/N
    return log_plan.argmax(1)


# --------------------------------------------------------------------------- Gumbel-softmax

def gumbel_temperature(update: int, total_updates: int, s: Settings) -> float:
    """Temperature at optimizer step `update` of `total_updates`: from `gumbel.temperature` (tau0) at the first step to
    `gumbel.min_temperature` (the floor) at the last, whatever the run's length, lowered every `gumbel.update_every`
    steps. exponential: tau0 * (floor / tau0)^f, f the fraction of the run done; cosine and linear: those curves
    between the two."""
    tau0, floor = s.temperature, s.min_temperature
    frac = min(1.0, (update - update % s.update_every) / max(1, total_updates - 1))
    if s.schedule == "exponential":
        return tau0 * (floor / tau0) ** frac
    if s.schedule == "cosine":
        return floor + (tau0 - floor) * (1 + math.cos(math.pi * frac)) / 2
    return tau0 + (floor - tau0) * frac


def gumbel_softmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """softmax((logits + g) / temperature) with g ~ Gumbel(0, 1); the temperature divides once."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    g = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
    return torch.softmax((logits + g) / temperature, dim=-1)


# --------------------------------------------------------------------------- the residual quantizer

@dataclass
class Quantized:
    z_q: torch.Tensor              # what the decoder sees
    codes: torch.Tensor            # [B, L] hard codes
    residuals: list[torch.Tensor]  # r_l, the input of level l
    codewords: list[torch.Tensor]  # e_l, the codeword of each item's code at level l


class ResidualQuantizer(nn.Module):
    """L levels of K codes; level l quantizes the residual r_l = z - e_1 - ... - e_{l-1}."""

    def __init__(self, levels: int, codebook_size: int, dim: int, *, gradient_mode: str = "ste",
                 last_level: str = "nearest"):
        super().__init__()
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, dim) / math.sqrt(dim))
        self.gradient_mode = gradient_mode
        self.last_level = last_level

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    def hard_codes(self, d2: torch.Tensor, level: int, prefix: torch.Tensor, last_level: str) -> torch.Tensor:
        """Each item's code at `level`; `prefix` [B, level] holds its earlier codes."""
        # The last level's assignment is for the final IDs only: in training Sinkhorn triples the step time for
        # no fewer collisions, and a batch is not the catalogue that `distinct` must tell apart.
        if level == self.levels - 1 and not self.training:
            if last_level == "sinkhorn":
                return sinkhorn_assign(d2)
            if last_level == "distinct":
                return distinct_assign(d2, prefix)
        return d2.argmin(1)

    def forward(self, z: torch.Tensor, temperature: float | None = None, last_level: str | None = None) -> Quantized:
        """`last_level`: the final IDs' last-level assignment, if not the quantizer's own."""
        residual, codes, residuals, codewords, subtracted = z, [], [], [], []
        relax = self.gradient_mode == "gumbel" and self.training
        for level, codebook in enumerate(self.codebooks):
            d2 = squared_distances(residual, codebook)
            code = self.hard_codes(d2.detach(), level, z.new_zeros((len(z), 0), dtype=torch.long) if level == 0
                                   else torch.stack(codes, 1), last_level or self.last_level)
            # A lookup whose backward is deterministic: indexing's (index_put_ with accumulate) sums a code's
            # gradients in a thread-dependent order on CPU, and the codebook came out different run to run.
            e = nn.functional.embedding(code, codebook)
            # Gumbel: the relaxed code choice (logits = negative distances) feeds the next level and the
            # decoder; the codebook terms use the hard codeword, so a flat softmax cannot pull codes together.
            step = gumbel_softmax(-d2, temperature) @ codebook if relax else e
            codes.append(code)
            residuals.append(residual)
            codewords.append(e)
            subtracted.append(step)
            residual = residual - step
        q = torch.stack(subtracted).sum(0)
        # Straight-through: the decoder's gradient passes to the encoder unchanged; the codebooks learn
        # from the codebook loss only (TIGER). Gumbel and RVQ differentiate through the codewords.
        z_q = z + (q - z).detach() if self.gradient_mode == "ste" else q
        return Quantized(z_q, torch.stack(codes, 1), residuals, codewords)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return sum(self.codebooks[level][codes[:, level]] for level in range(self.levels))


def rq_loss(x: torch.Tensor, x_hat: torch.Tensor, q: Quantized, beta: float) -> dict[str, torch.Tensor]:
    """recon + sum_l ||sg[r_l] - e_l||^2 + beta ||r_l - sg[e_l]||^2.

    Every term is a squared norm per item (summed over its dimensions) averaged over the batch: with
    a per-dimension mean on one term and a sum on the other, one would be width-times too weak.
    """
    def sq(a):
        return a.pow(2).sum(-1).mean()

    recon = sq(x - x_hat)
    codebook = sum(sq(r.detach() - e) for r, e in zip(q.residuals, q.codewords))
    commit = sum(sq(r - e.detach()) for r, e in zip(q.residuals, q.codewords))
    return {"loss": recon + codebook + beta * commit, "recon": recon, "codebook": codebook, "commit": commit}


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        linear = nn.Linear(a, b)
        # He init keeps the latent at the input's scale; PyTorch's default shrinks it ~3x per layer, and
        # near-equal code distances make the Gumbel softmax flat and its gradients vanish.
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class Tokenizer(nn.Module):
    """Standardise -> encoder -> residual quantizer -> decoder -> un-standardise."""

    def __init__(self, s: Settings):
        super().__init__()
        self.settings = s
        self.register_buffer("mean", torch.zeros(s.input_dim))
        self.register_buffer("std", torch.ones(s.input_dim))
        if s.neural:
            self.encoder = _mlp([s.input_dim, *s.hidden_dims, s.latent_dim])
            self.decoder = _mlp([s.latent_dim, *reversed(s.hidden_dims), s.input_dim])
        else:
            self.encoder = self.decoder = nn.Identity()
        latent = s.latent_dim if s.neural else s.input_dim
        self.quantizer = ResidualQuantizer(s.levels, s.codebook_size, latent, gradient_mode=s.gradient_mode,
                                           last_level=s.last_level)

    def set_standardization(self, x: torch.Tensor) -> None:
        if self.settings.standardize:
            self.mean.copy_(x.mean(0))
            self.std.copy_(x.std(0).clamp_min(1e-8))

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor, temperature: float | None = None) -> dict[str, torch.Tensor]:
        q = self.quantizer(self.latent(x), temperature)
        x_std = (x - self.mean) / self.std
        losses = rq_loss(x_std, self.decoder(q.z_q), q, self.settings.beta)
        losses["quantized"] = q
        return losses

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, generator: torch.Generator) -> list[dict]:
        """k-means on each level's residuals; returns the inertia history."""
        residual, history = self.latent(x), []
        for level in range(self.quantizer.levels):
            centers, inertia = kmeans(residual, self.quantizer.codebooks.shape[1], self.settings.kmeans_iters, generator)
            self.quantizer.codebooks[level].copy_(centers)
            history += [{"step": len(history), "level": level, "iteration": i, "inertia": v} for i, v in enumerate(inertia)]
            residual = residual - centers[squared_distances(residual, centers).argmin(1)]
        return history

    @torch.no_grad()
    def codes(self, x: torch.Tensor, last_level: str | None = None) -> torch.Tensor:
        was_training = self.training
        self.eval()
        codes = self.quantizer(self.latent(x), last_level=last_level).codes
        self.train(was_training)
        return codes

    @torch.no_grad()
    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.decode_codes(codes)) * self.std + self.mean

    def encode(self, embeddings: np.ndarray, last_level: str | None = None) -> np.ndarray:
        """[N, D] embeddings -> [N, L] int64 codes, in one batch: the last level's assignment (the settings', or
        `last_level`) balances or separates over all of them."""
        device = self.mean.device
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32), device=device)
        return self.codes(x, last_level).cpu().numpy().astype(np.int64)


# --------------------------------------------------------------------------- training

class DeadCodeReset:
    """Re-seed a code unused for `steps` consecutive batches to a residual the codebook serves badly."""

    def __init__(self, quantizer: ResidualQuantizer, steps: int, generator: torch.Generator):
        self.quantizer, self.steps, self.generator = quantizer, steps, generator
        levels, k, _ = quantizer.codebooks.shape
        self.unused = torch.zeros(levels, k, dtype=torch.long, device=quantizer.codebooks.device)

    @torch.no_grad()
    def __call__(self, q: Quantized) -> int:
        """Update the counters from one batch's codes and re-seed the dead codes; returns how many."""
        if self.steps <= 0:
            return 0
        reseeded = 0
        for level, codebook in enumerate(self.quantizer.codebooks):
            used = torch.bincount(q.codes[:, level], minlength=codebook.shape[0]) > 0
            self.unused[level] = torch.where(used, 0, self.unused[level] + 1)
            dead = self.unused[level] >= self.steps
            if dead.any():
                r = q.residuals[level].detach()
                nearest = squared_distances(r, codebook).min(1).values
                codebook[dead] = sample_far_points(r, nearest, int(dead.sum()), self.generator).to(codebook.dtype)
                self.unused[level][dead] = 0
                reseeded += int(dead.sum())
        return reseeded


def _lightning_module(model: Tokenizer, init_data: torch.Tensor, seed: int):
    import lightning as L

    s = model.settings

    class TokenizerModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.history: list[dict] = []
            self.init_history: list[dict] = []
            self._sums: dict = {}  # per-epoch sums of the loss terms, kept on the device
            self._last: Quantized | None = None

        def on_fit_start(self):
            # Generators live on the training device, so init and re-seeding run there too.
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
            x = init_data.to(self.device)
            self.model.set_standardization(x)
            if s.kmeans_init:
                self.init_history = self.model.init_codebooks(x, self.generator)
            self.dead_codes = DeadCodeReset(self.model.quantizer, s.dead_code_steps, self.generator)

        def temperature(self) -> float | None:
            if s.gradient_mode != "gumbel":
                return None
            return gumbel_temperature(self.global_step, self.trainer.estimated_stepping_batches, s)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            out = self.model(x, self.temperature())
            self._last = out.pop("quantized")
            for name, value in out.items():
                self._sums[name] = self._sums.get(name, 0.0) + value.detach() * len(x)
            self._sums["items"] = self._sums.get("items", 0) + len(x)
            return out["loss"]

        def on_train_batch_end(self, outputs, batch, batch_idx):
            # After the optimizer step: re-seeding earlier would modify codebooks the backward pass needs.
            self._sums["reseeded"] = self._sums.get("reseeded", 0) + self.dead_codes(self._last)
            self._last = None

        def on_train_epoch_end(self):
            items = self._sums.pop("items")
            row = {"step": int(self.global_step), "epoch": int(self.current_epoch),
                   "reseeded": int(self._sums.pop("reseeded"))}
            row.update({k: float(v) / items for k, v in self._sums.items()})
            if s.gradient_mode == "gumbel":
                row["temperature"] = self.temperature()
            self.history.append(row)
            self._sums = {}

        def configure_optimizers(self):
            return torch.optim.Adam(self.model.parameters(), lr=s.lr)

    return TokenizerModule()


def _trainer_kwargs(trainer: Mapping | None) -> dict:
    trainer = dict(trainer or {})
    devices = trainer.get("devices", 1)
    # The tokenizer is small: one device ("auto" on a multi-GPU machine would launch DDP), and always fp32, whatever
    # `trainer.precision` says for TIGER: it is fast either way, and its codes are nearest-distance choices that bf16
    # would blur.
    return {"accelerator": trainer.get("accelerator", "auto"),
            "devices": 1 if devices in ("auto", -1) else devices,
            "precision": "32-true"}


def _train(model: Tokenizer, x: torch.Tensor, s: Settings, seed: int, trainer: Mapping | None) -> list[dict]:
    import lightning as L
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    module = _lightning_module(model, x, seed)
    # Whole batches by index: per-item fetching and collation would dominate on CPU.
    sampler = BatchSampler(RandomSampler(range(len(x)), generator=torch.Generator().manual_seed(seed)),
                           batch_size=min(s.batch_size, len(x)), drop_last=False)
    loader = DataLoader(TensorDataset(x), batch_size=None, sampler=sampler)
    fit = L.Trainer(max_epochs=s.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0,
                    **_trainer_kwargs(trainer))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        fit.fit(module, loader)
    return module.init_history + module.history


# --------------------------------------------------------------------------- public interface

@dataclass
class CodebookResult:
    codes: np.ndarray       # int64 [N, L], hard codes per item
    state: dict             # torch.save-able; load_quantizer(state) rebuilds the tokenizer
    report: dict            # JSON-able quality report
    usage_rows: list[dict]  # {"level", "code", "count"} for dvc plots
    history: list[dict]     # per-epoch loss terms (and k-means inertia rows)


def fit_codebook(embeddings: np.ndarray, cfg: Mapping, *, seed: int, trainer: Mapping | None = None,
                 source: str = "embeddings") -> CodebookResult:
    """Train the `codebook.method` tokenizer on [N, input_dim] item embeddings."""
    s = Settings.parse(cfg)
    check_inputs(embeddings, s, source)
    torch.manual_seed(seed)
    model = Tokenizer(s)
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))

    start = time.perf_counter()
    if s.method == "rqkmeans":
        device = trainer_device(str((trainer or {}).get("accelerator", "auto")))
        model.to(device)
        xd = x.to(device)
        model.set_standardization(xd)
        history = model.init_codebooks(xd, torch.Generator(device=device).manual_seed(seed))
    else:
        history = _train(model, x, s, seed, trainer)
    train_seconds = time.perf_counter() - start

    model.cpu().eval()
    codes = model.encode(x.numpy())
    report, usage_rows = quality_report(model, x, codes)
    # What the quantizer alone achieves: every level at its nearest code, no balancing or separating.
    report["unique_fraction_nearest"] = collision_stats(model.encode(x.numpy(), last_level="nearest"))["unique_fraction"]
    report.update(method=s.method if not s.neural else f"rqvae-{s.quantize}", train_seconds=round(train_seconds, 2))
    state = {"method": s.method, "cfg": _plain(cfg), "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}
    return CodebookResult(codes=codes, state=state, report=report, usage_rows=usage_rows, history=history)


def load_quantizer(state: dict) -> Tokenizer:
    """The trained tokenizer back from `CodebookResult.state` (e.g. after torch.save / torch.load)."""
    model = Tokenizer(Settings.parse(state["cfg"]))
    model.load_state_dict(state["state_dict"])
    return model.eval()


def quality_report(model: Tokenizer, x: torch.Tensor, codes: np.ndarray) -> tuple[dict, list[dict]]:
    """Reconstruction error, per-level usage and perplexity, and collisions of the code tuples."""
    k = model.settings.codebook_size
    x_hat = model.reconstruct(torch.as_tensor(codes, device=model.mean.device))
    usage, perplexity, rows = [], [], []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=k)
        p = counts[counts > 0] / counts.sum()
        usage.append(float((counts > 0).mean()))
        perplexity.append(float(np.exp(-(p * np.log(p)).sum())))
        rows += [{"level": level, "code": c, "count": int(n)} for c, n in enumerate(counts)]
    report = {"recon_mse": float((x.to(x_hat.device) - x_hat).pow(2).mean()), "usage": usage, "perplexity": perplexity,
              "levels": int(codes.shape[1]), "codebook_size": k, "num_items": int(len(codes))}
    report.update(collision_stats(codes))
    return report, rows


def _plain(cfg: Mapping):
    if isinstance(cfg, Mapping):
        return {str(k): _plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [_plain(v) for v in cfg]
    return cfg
