"""train stage: sequences of semantic IDs -> a trained TIGER, with Lightning.

The history is the user's most recent `tiger.max_history` items, each written as its SID
tokens, after one hashed user token (TIGER); the decoder generates the next item's SID.
Every prefix of a user's training history is a training example for its next item; the
validation target (second-to-last item) picks the checkpoint on NDCG@10 and stops early.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rastp.beam_search import SidCatalogue, beam_search
from rastp.config import ConfigError
from rastp.data import split_user
from rastp.evaluation import ranking_metrics
from rastp.hardware import resolve_precision
from rastp.io import read_json, write_json
from rastp.tiger import RastpConfig, Tiger

PAD = 0  # padding and decoder start token
VALIDATION_TOP_K = 10  # validation scores each history's top 10: val/ndcg@10 picks the checkpoint


@dataclass(frozen=True)
class SidVocabulary:
    """One vocabulary for every SID level (codes shifted by per-level offsets) plus user buckets."""

    level_sizes: tuple[int, ...]  # L codebook sizes, then the de-duplication level's size
    user_buckets: int

    @property
    def offsets(self) -> np.ndarray:
        return 1 + np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]])

    @property
    def user_offset(self) -> int:
        return 1 + int(sum(self.level_sizes))

    @property
    def size(self) -> int:
        return self.user_offset + self.user_buckets

    @property
    def sid_length(self) -> int:
        return len(self.level_sizes)

    def item_tokens(self, sids: np.ndarray) -> np.ndarray:
        """[N, S] codes -> [N, S] token ids."""
        if sids.shape[1] != self.sid_length or (sids >= np.asarray(self.level_sizes)).any() or (sids < 0).any():
            raise ValueError(f"SIDs of shape {sids.shape} do not fit level sizes {self.level_sizes}")
        return (sids + self.offsets).astype(np.int64)

    def user_token(self, user: int) -> list[int]:
        # Knuth's multiplicative hash spreads consecutive ids over the buckets (TIGER hashes user ids).
        return [self.user_offset + (user * 2654435761) % self.user_buckets] if self.user_buckets else []


@dataclass(frozen=True)
class Example:
    user: int
    history: Sequence[int]  # item ids, oldest first, already cut to max_history
    target: int
    seen: Sequence[int] = ()  # valid / test: every item the user had before the target, uncut (train: not needed)


def make_examples(sequences: Sequence[Sequence[int]], split: str, max_history: int) -> list[Example]:
    """train: every prefix of each training history; valid / test: one example per user."""
    examples = []
    for user, items in enumerate(sequences):
        history, valid_target, test_target = split_user(items)
        if split == "train":
            examples += [Example(user, history[max(0, t - max_history):t], history[t]) for t in range(1, len(history))]
        elif split == "valid":
            examples.append(Example(user, history[-max_history:], valid_target, history))
        elif split == "test":
            seen = history + [valid_target]
            examples.append(Example(user, seen[-max_history:], test_target, seen))
        else:
            raise ValueError(f"unknown split {split!r}")
    return examples


class SequenceBatches(Dataset):
    """Examples -> (input_ids, attention_mask, labels, target item) batches."""

    def __init__(self, examples: list[Example], item_tokens: np.ndarray, vocab: SidVocabulary):
        self.examples, self.item_tokens, self.vocab = examples, item_tokens, vocab

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        rows = [self.vocab.user_token(e.user) + self.item_tokens[list(e.history)].reshape(-1).tolist() for e in examples]
        input_ids = pad_rows(rows, PAD)
        targets = torch.tensor([e.target for e in examples])
        return {
            "input_ids": input_ids,
            "attention_mask": input_ids != PAD,
            "labels": torch.from_numpy(self.item_tokens[targets.numpy()]),
            "target": targets,
            "seen": pad_rows([e.seen for e in examples], -1),
        }


def length_order(examples: Sequence[Example]) -> list[int]:
    """Example indices, shortest history first (stable). Batched in this order, evaluation encodes and attends over
    little padding: a batch of 128 Beauty test users in their own order is padded to 81 tokens, against 30 on average,
    and so is the cross-attention over its encoder states where RASTP does not prune them."""
    return sorted(range(len(examples)), key=lambda index: len(examples[index].history))


def pad_rows(rows: Sequence[Sequence[int]], padding: int) -> torch.LongTensor:
    """[len(rows), longest row] with each row left-aligned and `padding` after it."""
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), padding, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class SequenceDataModule(L.LightningDataModule):
    def __init__(self, sequences, item_tokens: np.ndarray, vocab: SidVocabulary, *, max_history: int,
                 batch_size: int, eval_batch_size: int, num_workers: int = 0):
        super().__init__()
        self.sets = {split: SequenceBatches(make_examples(sequences, split, max_history), item_tokens, vocab)
                     for split in ("train", "valid", "test")}
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        data = self.sets[split]
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=data.collate,
                          sampler=None if shuffle else length_order(data.examples),  # an evaluation's order is free
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader("train", self.batch_size, True)

    def val_dataloader(self):
        return self._loader("valid", self.eval_batch_size, False)

    def test_dataloader(self):
        return self._loader("test", self.eval_batch_size, False)


def model_kwargs(tiger_cfg: Mapping, vocab: SidVocabulary) -> dict:
    """Tiger constructor arguments from the `tiger` params."""
    keys = ("num_layers", "num_decoder_layers", "d_model", "num_heads", "d_kv", "d_ff", "dropout", "tie_embeddings",
            "packed_dropout", "catalogue_softmax")
    max_input_length = len(vocab.user_token(0)) + int(tiger_cfg["max_history"]) * vocab.sid_length
    return {"vocab_size": vocab.size, "sid_length": vocab.sid_length, **{k: tiger_cfg[k] for k in keys},
            "rastp": dict(tiger_cfg["rastp"]), "max_input_length": max_input_length}


def next_sid_loss(model: Tiger, batch: dict, catalogue: SidCatalogue) -> torch.Tensor:
    """The mean token cross-entropy of a batch's target SIDs; with `catalogue_softmax` each token's softmax is over
    the catalogue's continuations of its prefix."""
    allowed = catalogue.allowed_tokens(batch["labels"], model.t5.config.vocab_size) if model.catalogue_softmax else None
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"], allowed)


class TigerModule(L.LightningModule):
    """Next-SID cross-entropy training; validation = constrained beam search, Recall/NDCG@10."""

    def __init__(self, model: dict, item_tokens: np.ndarray, *, optimizer: str, lr: float, weight_decay: float,
                 warmup_steps: int, schedule: str, val_beam_size: int, exclude_seen: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["item_tokens"])
        self.model = Tiger(**{**model, "rastp": RastpConfig(**model["rastp"])})
        self.catalogue = SidCatalogue(torch.from_numpy(item_tokens))

    def training_step(self, batch, batch_idx):
        self.model.set_training_progress(self.global_step / self.trainer.estimated_stepping_batches)
        loss = next_sid_loss(self.model, batch, self.catalogue.to(self.device))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def validation_step(self, batch, batch_idx):
        size = len(batch["target"])
        self.log("val/loss", next_sid_loss(self.model, batch, self.catalogue.to(self.device)), batch_size=size,
                 sync_dist=True)
        found = beam_search(self.model, batch["input_ids"], batch["attention_mask"], self.catalogue.to(self.device),
                            beam_size=self.hparams.val_beam_size, top_k=VALIDATION_TOP_K,
                            seen=batch["seen"] if self.hparams.exclude_seen else None)
        for name, value in ranking_metrics(found.items, batch["target"], ks=(VALIDATION_TOP_K,)).items():
            self.log(f"val/{name}", value, prog_bar=name == "ndcg@10", batch_size=size, sync_dist=True)

    def configure_optimizers(self):
        optimizer, scheduler = make_optimizer(self.model, self.hparams.optimizer, lr=self.hparams.lr,
                                              weight_decay=self.hparams.weight_decay,
                                              warmup_steps=self.hparams.warmup_steps, schedule=self.hparams.schedule,
                                              total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("cosine", "constant")


def make_optimizer(model: torch.nn.Module, name: str, *, lr: float, weight_decay: float, warmup_steps: int,
                   total_steps: int, schedule: str = "cosine"):
    """Adafactor (T5's and TIGER's) or AdamW, and a linear warm-up of `lr` (at most a tenth of training), then either
    a cosine decay to 10% of `lr` or a constant `lr`.

    Adafactor's step is relative to each weight's RMS, at most min(lr, 1/sqrt(step)): with lr 0.01 and the constant
    schedule that is TIGER's "0.01 for 10k steps, then inverse square-root decay". T5 initialises its embeddings
    and output layer with std 1, so an absolute step such as AdamW's moves them, and with them the logits, slowly.
    """
    if name == "adafactor":
        optimizer = torch.optim.Adafactor(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ConfigError(f"train.optimizer: {name!r} is not one of {OPTIMIZERS}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule: {schedule!r} is not one of {SCHEDULES}")
    total = max(1, int(total_steps))
    warmup = max(1, min(warmup_steps, total // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ValidateLastStep(L.Callback):
    """Stops training after its last step through `should_stop`, on which Lightning validates, as for early stopping.
    By `val_check_interval` alone a last step that is not a multiple of it goes unvalidated, and the steps after the
    last validation could never be chosen (1000 steps validated every 600 would keep step 600's model)."""

    def __init__(self, last_step: int):
        self.last_step = last_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step >= self.last_step:
            trainer.should_stop = True


class ProgressLog(L.Callback):
    """One line every `every` steps and after each validation: readable in DVC's logs and CI, unlike a tqdm bar. Keeps
    each validation's metrics by step (`validations`)."""

    def __init__(self, every: int = 50):
        self.every, self.start, self.examples = every, None, 0
        self.validations: dict[int, dict[str, float]] = {}  # step -> {"ndcg@10": ..., "loss": ...}

    def on_train_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.examples += len(batch["target"])
        step = trainer.global_step
        if step % self.every == 0:
            elapsed = time.perf_counter() - self.start
            total = trainer.estimated_stepping_batches
            print(f"[train] step {step}/{total} epoch {trainer.current_epoch} loss {float(outputs['loss']):.4f} "
                  f"{self.examples / elapsed:.0f} examples/s {elapsed / 60:.1f} min", file=sys.stderr, flush=True)

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()
                       if k.startswith("val/")}
            self.validations[trainer.global_step] = metrics
            shown = {k: round(v, 4) for k, v in metrics.items()}
            print(f"[train] step {trainer.global_step} validation {shown}", file=sys.stderr, flush=True)


def save_model(path: Path, module: TigerModule, vocab: SidVocabulary) -> None:
    torch.save({"model": module.hparams.model, "state_dict": module.model.state_dict(),
                "level_sizes": list(vocab.level_sizes), "user_buckets": vocab.user_buckets}, path)


def load_model(path: Path, map_location="cpu") -> tuple[Tiger, SidVocabulary]:
    saved = torch.load(path, map_location=map_location, weights_only=False)
    kwargs = saved["model"]
    model = Tiger(**{**kwargs, "rastp": RastpConfig(**kwargs["rastp"])})
    model.load_state_dict(saved["state_dict"])
    return model.eval(), SidVocabulary(tuple(saved["level_sizes"]), saved["user_buckets"])


def train_tiger(sequences, sids: np.ndarray, level_sizes: Sequence[int], cfg: Mapping, model_path: Path,
                checkpoint_dir: Path, live_dir: Path, *, seed: int) -> dict:
    """Fit TIGER on one dataset; saves the best model on validation NDCG@10 to `model_path`, training curves to
    `live_dir` (DVCLive), whose metrics.json gets the saved model's step and validation metrics (`saved_model`) beside
    the last values logged."""
    from dvclive.lightning import DVCLiveLogger
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    L.seed_everything(seed, workers=True)
    tiger_cfg, train_cfg, trainer_cfg = cfg["tiger"], cfg["train"], cfg["trainer"]
    if int(train_cfg["val_beam_size"]) < VALIDATION_TOP_K:  # a beam returns at most its width of items
        raise ConfigError(f"train.val_beam_size: {train_cfg['val_beam_size']} is below the {VALIDATION_TOP_K} items a "
                          "validation list is scored on")
    vocab = SidVocabulary(tuple(level_sizes), int(tiger_cfg["user_buckets"]))
    item_tokens = vocab.item_tokens(sids)
    data = SequenceDataModule(sequences, item_tokens, vocab, max_history=int(tiger_cfg["max_history"]),
                              batch_size=int(train_cfg["batch_size"]), eval_batch_size=int(cfg["evaluate"]["batch_size"]),
                              num_workers=int(train_cfg["num_workers"]))
    module = TigerModule(model_kwargs(tiger_cfg, vocab), item_tokens, optimizer=str(train_cfg["optimizer"]),
                         lr=float(train_cfg["lr"]), weight_decay=float(train_cfg["weight_decay"]),
                         warmup_steps=int(train_cfg["warmup_steps"]), schedule=str(train_cfg["schedule"]),
                         val_beam_size=int(train_cfg["val_beam_size"]),
                         exclude_seen=bool(cfg["evaluate"]["exclude_seen"]))
    checkpoints = ModelCheckpoint(dirpath=checkpoint_dir, monitor="val/ndcg@10", mode="max", save_top_k=1,
                                  filename="best")
    max_minutes = float(train_cfg["max_time_minutes"])
    # Validate every `val_every_steps` (0: once per epoch), and after the last step (`ValidateLastStep`): a checkpoint
    # is only ever chosen by validation.
    steps_per_epoch = math.ceil(len(data.sets["train"]) / int(train_cfg["batch_size"]))
    max_steps, max_epochs = int(train_cfg["max_steps"]), int(train_cfg["max_epochs"])
    limits = ([max_steps] if max_steps > 0 else []) + ([max_epochs * steps_per_epoch] if max_epochs > 0 else [])
    if not limits:
        raise ConfigError("train.max_steps and train.max_epochs are both unlimited: set one of them")
    val_every = min(int(train_cfg["val_every_steps"]), min(limits))
    precision = resolve_precision(str(trainer_cfg["precision"]), str(trainer_cfg["accelerator"]))
    print(f"[train] precision {precision}", file=sys.stderr, flush=True)
    progress = ProgressLog()
    trainer = L.Trainer(
        **{**trainer_cfg, "precision": precision}, max_epochs=max_epochs, max_steps=max_steps,
        max_time={"minutes": max_minutes} if max_minutes > 0 else None,
        val_check_interval=val_every or None, check_val_every_n_epoch=None if val_every else 1,
        callbacks=[checkpoints, EarlyStopping(monitor="val/ndcg@10", mode="max", patience=int(train_cfg["patience"])),
                   ValidateLastStep(min(limits)), progress],
        enable_progress_bar=False,
        logger=DVCLiveLogger(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False),
        default_root_dir=checkpoint_dir, deterministic=False, enable_model_summary=False, log_every_n_steps=20,
    )
    trainer.fit(module, datamodule=data)
    summary = {"best_val_ndcg@10": float(checkpoints.best_model_score), "epochs": trainer.current_epoch,
               "steps": trainer.global_step, "train_examples": len(data.sets["train"]), "precision": precision}
    if trainer.global_rank == 0:  # the only rank that saves checkpoints
        best = torch.load(checkpoints.best_model_path, map_location="cpu", weights_only=False)
        summary["best_step"] = best["global_step"]
        module.cpu().load_state_dict(best["state_dict"])
        save_model(model_path, module, vocab)
        # DVCLive's metrics.json holds the values logged last; the model saved is the best validation's.
        metrics_file = live_dir / "metrics.json"
        write_json(metrics_file, {**read_json(metrics_file), "saved_model": {
            "step": summary["best_step"], "val": progress.validations[summary["best_step"]]}})
    return summary
