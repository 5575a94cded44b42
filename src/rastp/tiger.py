"""TIGER with RASTP token pruning.

TIGER (Rajput et al., 2023, "Recommender Systems with Generative Retrieval") is a T5 encoder-decoder that reads a
user's history as semantic-ID tokens and generates the next item's semantic ID. RASTP token pruning scores the
encoder's tokens after one block (attention received x representation norm) and keeps only the most important ones,
so the later encoder blocks and the decoder's cross-attention run on a shorter sequence.

The model is a stock `transformers.T5ForConditionalGeneration` (`Tiger.t5`): its weights, decoder and `generate`
are the stock ones (its feed-forward blocks, and on CPU its dropout, swapped for cheaper equivalents: `FeedForward`,
`PackedDropout`). Only the encoder is run by our own loop over `t5.encoder.block`, because pruning happens between
two of its blocks. With pruning off, `Tiger.encode` equals `t5.encoder` exactly. With `catalogue_softmax` the loss
takes each SID token's softmax over the tokens the catalogue allows after its prefix (and the beam search scores alike).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, T5Config, T5ForConditionalGeneration
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, create_bidirectional_mask, sdpa_mask
from transformers.models.t5.modeling_t5 import T5Attention

from rastp.config import ConfigError

SCORES = ("rastp", "norm", "attention", "random")
KEEP_RATIO_OF = ("row", "max_length")


@dataclass
class RastpConfig:
    """RASTP switches (params.yaml `tiger.rastp`)."""

    enabled: bool = False
    prune_layer: int = 2  # prune after this encoder block (1-based)
    keep_ratio: float = 0.34
    # row: a row keeps ceil(keep_ratio * its real tokens), at least 1. max_length: a row keeps at most
    # ceil(keep_ratio * max_input_length) tokens, a shorter row all of them (the published code: a third of its fixed
    # padded length).
    keep_ratio_of: str = "row"
    score: str = "rastp"  # rastp | norm | attention | random
    at_eval: bool = True  # also prune in eval mode (validation/test), as in training
    keep_positions: bool = True  # later blocks see the kept tokens' original relative positions
    # Prune in the first `until` of the training steps; the rest train on whole histories (the final unpruned steps of
    # token dropping, Hou et al., 2022), so that the later blocks also learn to read every token.
    until: float = 1.0

    def __post_init__(self):
        if self.score not in SCORES:
            raise ConfigError(f"tiger.rastp.score: {self.score!r} is not one of {SCORES}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"tiger.rastp.keep_ratio: {self.keep_ratio} is not in (0, 1]")
        if not 0.0 <= self.until <= 1.0:
            raise ConfigError(f"tiger.rastp.until: {self.until} is not in [0, 1]")
        if self.keep_ratio_of not in KEEP_RATIO_OF:
            raise ConfigError(f"tiger.rastp.keep_ratio_of: {self.keep_ratio_of!r} is not one of {KEEP_RATIO_OF}")


def packed_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout whose keep mask is cut from 64-bit random words, four 16-bit draws each (on CPU).

    torch's CPU dropout draws one random number per element: at TIGER's sizes that is a quarter of a training step,
    more than the attention matmuls. Four elements per 64-bit draw make the mask ~3x cheaper. The drop probability
    is p rounded to a multiple of 1/65536. On other devices (CUDA's dropout is cheap already): torch's dropout.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return nn.functional.dropout(x, p, training=True)
    if p >= 1.0:
        return torch.zeros_like(x)
    drops = round(p * 65536)  # of the 65536 values of a 16-bit draw, this many drop the element
    words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= drops - 32768
    return x * keep * (65536 / (65536 - drops))


class FeedForward(nn.Module):
    """T5's feed-forward block (`DenseReluDense`: wi, ReLU, dropout, wo) with its weights and outputs, less one cast.

    T5's casts the ReLU's output to wo's weight dtype: under bf16 autocast (bf16-mixed) that sends the widest
    activation, [B, T, d_ff], from bf16 to fp32 and back (autocast casts it again for wo), forward and backward, for
    nothing. The ReLU is in place. bf16-mixed training steps run 1.02x-1.08x faster on CPU, bit for bit the same
    (bench/README.md).
    """

    def __init__(self, dense: nn.Module):
        super().__init__()
        self.wi, self.dropout, self.wo = dense.wi, dense.dropout, dense.wo

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(self.wi(hidden_states).relu_()))


class PackedDropout(nn.Dropout):
    """`nn.Dropout` with `packed_dropout`'s mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_dropout(x, self.p, self.training)


def tiger_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, position_bias: torch.Tensor | None = None,
                    attention_probs: bool = False, **kwargs):
    """transformers' SDPA attention, except where the attention weights are formed here (T5: q.k + position bias,
    masked, softmax), which returns them too:

    - `attention_probs=True` (any device): RASTP's pruning block, whose probabilities (before dropout) score the tokens;
    - on CPU, dropout with `packed_dropout` (the model config's `packed_dropout`): so that the weights' dropout uses its
      mask;
    - on CPU, bf16 with gradients (bf16-mixed training): SDPA's CPU kernels (the fused one for cross-attention, its
      math fallback where the position bias needs gradients) run their bf16 backward far slower than these matmuls;
      TIGER's bf16 training steps run ~1.4x faster this way (bench/README.md). In fp32 (and without gradients)
      SDPA is as fast or faster, and stays.

    The masks are SDPA's: boolean (True: attend) or additive, or None with `is_causal` for causal self-attention.
    """
    packed = dropout > 0.0 and module.config.packed_dropout
    bf16_training = query.dtype == torch.bfloat16 and torch.is_grad_enabled()
    if not attention_probs and (query.device.type != "cpu" or not (packed or bf16_training)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    scores = query @ key.transpose(2, 3) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if position_bias is not None:
        scores = scores + position_bias
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and query.shape[2] > 1:
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
                  if attention_mask.dtype == torch.bool else scores + attention_mask)
    probs = scores.softmax(dim=-1)
    weights = (packed_dropout(probs, dropout, training=True) if packed
               else nn.functional.dropout(probs, dropout, training=True))
    return (weights @ value).transpose(1, 2).contiguous(), probs


# Registered under its own name (with SDPA's masks): the stock `sdpa` entry stays untouched for every other model.
TIGER_ATTENTION = "tiger_sdpa"
AttentionInterface.register(TIGER_ATTENTION, tiger_attention)
AttentionMaskInterface.register(TIGER_ATTENTION, sdpa_mask)


def token_importance(score: str, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                     attention_probs: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance [B, T] of each token after the pruning block (higher is kept first).

    rastp:     attention the token receives (summed over heads and real queries) x L2 norm of its hidden state
    attention: the attention received alone; norm: the L2 norm alone; random: uniform noise (ablation)
    """
    if score == "random":
        return torch.rand(attention_mask.shape, generator=generator, device=attention_mask.device)
    norm = hidden_states.norm(dim=-1)
    if score == "norm":
        return norm
    # Padding queries must not vote for any token.
    received = torch.einsum("bhqk,bq->bk", attention_probs, attention_mask.to(attention_probs.dtype))
    return received if score == "attention" else received * norm


def select_tokens(importance: torch.Tensor, attention_mask: torch.Tensor, keep_ratio: float,
                  max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, K] of the tokens to keep, in their original order, and their mask [B, K].

    Row b keeps its k_b = max(1, ceil(keep_ratio * n_b)) most important real tokens (n_b real tokens); given
    `max_length`, k_b = min(n_b, ceil(keep_ratio * max_length)): one budget for every row, which a shorter row keeps
    whole. K is the largest k_b of the batch (at least 1); a row with k_b < K is filled up with masked tokens. Padding
    is never kept: a row of padding only (TIGER's rows all have a user token) keeps none, all masked.
    """
    real = attention_mask.bool()
    num_real = real.sum(dim=1)
    length = num_real if max_length is None else torch.full_like(num_real, max_length)
    # In float64 with a tolerance, so that e.g. 0.1 * 30 keeps 3 tokens, not ceil(3.0000000000000004) = 4.
    num_keep = torch.minimum(torch.ceil(length.double() * keep_ratio - 1e-9).long().clamp(min=1), num_real)
    width = max(1, int(num_keep.max()))
    importance = importance.masked_fill(~real, float("-inf"))
    ranked = importance.topk(width, dim=1).indices  # most important first
    kept = torch.arange(width, device=ranked.device)[None, :] < num_keep[:, None]
    length = attention_mask.shape[1]
    # Sorting by position puts the kept tokens first in their original order, the filling tokens after them.
    order = torch.where(kept, ranked, ranked + length).sort(dim=1).values
    return order % length, order < length


@dataclass
class BeamCache:
    """The decoder's self-attention keys and values of every beam's prefix (`Tiger.beam_step`): per decoder block, one
    [R, H, d_kv] tensor per position of the prefix, R beams. A step appends a position and copies nothing earlier
    (transformers' DynamicCache concatenates at every step)."""

    keys: list[list[torch.Tensor]]
    values: list[list[torch.Tensor]]

    @classmethod
    def empty(cls, num_blocks: int) -> BeamCache:
        return cls([[] for _ in range(num_blocks)], [[] for _ in range(num_blocks)])

    @property
    def length(self) -> int:
        """Positions cached so far."""
        return len(self.keys[0])

    def select(self, beams: torch.LongTensor) -> BeamCache:
        """The cache of the given beams [R'] (one beam may be taken for several: continuations of one prefix)."""
        return BeamCache(*([[t.index_select(0, beams) for t in block] for block in blocks]
                           for blocks in (self.keys, self.values)))


class Tiger(nn.Module):
    """TIGER: a T5 encoder-decoder over semantic-ID tokens, with optional RASTP pruning in the encoder.

    Token 0 is padding and the decoder start token. The decoder emits exactly `sid_length` tokens (no EOS).
    """

    def __init__(self, *, vocab_size: int, sid_length: int, num_layers: int = 4, num_decoder_layers: int = 4,
                 d_model: int = 128, num_heads: int = 6, d_kv: int = 64, d_ff: int = 1024, dropout: float = 0.1,
                 tie_embeddings: bool = True, packed_dropout: bool = True, catalogue_softmax: bool = False,
                 rastp: RastpConfig | Mapping | None = None, max_input_length: int | None = None):
        super().__init__()
        self.sid_length = sid_length
        self.max_input_length = max_input_length  # the longest history in tokens (`keep_ratio_of: max_length`)
        # Each SID token's softmax over the tokens the catalogue allows after its prefix (training and beam search)
        # rather than over the whole vocabulary: p(item | history) is then a distribution over the catalogue.
        self.catalogue_softmax = catalogue_softmax
        self.rastp = rastp if isinstance(rastp, RastpConfig) else RastpConfig(**(rastp or {}))
        if not 1 <= self.rastp.prune_layer <= num_layers:
            raise ConfigError(f"tiger.rastp.prune_layer: {self.rastp.prune_layer} is not in 1..{num_layers}")
        if self.rastp.keep_ratio_of == "max_length" and max_input_length is None:
            raise ConfigError("tiger.rastp.keep_ratio_of: max_length needs the model's max_input_length")
        config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                          num_decoder_layers=num_decoder_layers, num_heads=num_heads, dropout_rate=dropout,
                          feed_forward_proj="relu", pad_token_id=0, decoder_start_token_id=0, eos_token_id=None)
        # Tied (T5 v1.0, transformers' default): one embedding table for the history's tokens, the decoder's input
        # tokens and the output layer. Untied: three tables, each initialised as the tied one (std 1), with the same
        # d_model^-0.5 logit scale. transformers 5 only unties when told after the config is built.
        config.tie_word_embeddings = tie_embeddings
        config.packed_dropout = packed_dropout  # the same dropout, with a cheaper mask on CPU (`packed_dropout`)
        config._attn_implementation = TIGER_ATTENTION
        self.t5 = T5ForConditionalGeneration(config)
        for block in (*self.t5.encoder.block, *self.t5.decoder.block):
            feed_forward = block.layer[-1]
            feed_forward.DenseReluDense = FeedForward(feed_forward.DenseReluDense)
        if not tie_embeddings:  # untied, `shared` would be left unused (DDP needs every parameter used)
            self.t5.encoder.embed_tokens = self.t5.shared
        if packed_dropout:
            for module in list(self.t5.modules()):
                for name, child in module.named_children():
                    if type(child) is nn.Dropout:
                        setattr(module, name, PackedDropout(child.p))
        # Seeds the `random` score; None uses torch's global generator.
        self.generator: torch.Generator | None = None
        self.prunes_in_training = True  # false once training has passed `rastp.until` (`set_training_progress`)

    def set_training_progress(self, fraction: float) -> None:
        """Tell the model how far training is (steps done / all steps): past `rastp.until` it trains unpruned."""
        self.prunes_in_training = fraction < self.rastp.until

    @property
    def prunes(self) -> bool:
        """Whether RASTP applies in the current mode."""
        return self.rastp.enabled and (self.prunes_in_training if self.training else self.rastp.at_eval)

    def encode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder hidden states [B, T', d] and their mask [B, T'] (T' <= T: the kept tokens' width where RASTP prunes,
        else T)."""
        encoder = self.t5.encoder
        hidden_states = encoder.dropout(encoder.embed_tokens(input_ids))
        mask4d = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden_states,
                                           attention_mask=attention_mask)
        position_bias = None  # block 0 computes T5's relative position bias; the later blocks share it
        for number, block in enumerate(encoder.block, start=1):
            if not (self.prunes and number == self.rastp.prune_layer):
                hidden_states, position_bias, _ = block(hidden_states, mask4d, position_bias)
                continue
            # The pruning block layer by layer (self-attention, then feed-forward), so that its self-attention hands
            # over the probabilities it forms anyway: RASTP's scores cost no second pass over q and k. (T5Block's
            # clamp of fp16 overflow is left out here: it only acts in pure fp16, `16-true`.)
            hidden_states, position_bias, probs = block.layer[0](hidden_states, mask4d, position_bias,
                                                                 attention_probs=True)
            hidden_states = block.layer[-1](hidden_states)
            hidden_states, attention_mask, position_bias = self._prune(hidden_states, probs, attention_mask,
                                                                       position_bias)
            mask4d = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden_states,
                                               attention_mask=attention_mask)
        hidden_states = encoder.dropout(encoder.final_layer_norm(hidden_states))
        return hidden_states, attention_mask

    def _prune(self, hidden_states: torch.Tensor, attention_probs: torch.Tensor, attention_mask: torch.Tensor,
               position_bias: torch.Tensor):
        """RASTP after the pruning block, given its output and its self-attention probabilities [B, H, T, T]: the kept
        tokens' hidden states, their mask and the position bias between them."""
        if attention_probs is None and self.rastp.score in ("rastp", "attention"):
            raise RuntimeError(f"tiger.rastp.score={self.rastp.score} scores with the attention probabilities that "
                               f"TIGER's attention ({TIGER_ATTENTION!r}) hands over; this model's attention is "
                               f"{self.t5.config._attn_implementation!r}")
        with torch.no_grad():  # the selection is discrete: no gradient flows through the scores
            importance = token_importance(self.rastp.score, hidden_states, attention_mask, attention_probs,
                                          self.generator)
            max_length = self.max_input_length if self.rastp.keep_ratio_of == "max_length" else None
            index, kept = select_tokens(importance, attention_mask, self.rastp.keep_ratio, max_length)
        hidden_states = hidden_states.gather(1, index[..., None].expand(-1, -1, hidden_states.shape[-1]))
        if self.rastp.keep_positions:
            position_bias = self.relative_position_bias(index)  # index = the kept tokens' original positions
        else:  # as the published RASTP code: the bias of the compact positions 0..K-1
            position_bias = self._position_attention.compute_bias(index.shape[1], index.shape[1])
        return hidden_states, kept.to(attention_mask.dtype), position_bias

    @property
    def _position_attention(self) -> T5Attention:
        """The encoder self-attention that owns T5's relative position bias (block 0; the others share it)."""
        return self.t5.encoder.block[0].layer[0].SelfAttention

    def relative_position_bias(self, positions: torch.LongTensor) -> torch.Tensor:
        """T5's encoder position bias [B, H, K, K] between tokens at the given positions [B, K]."""
        attention = self._position_attention
        relative = positions[:, None, :] - positions[:, :, None]  # key position - query position, as T5
        buckets = T5Attention._relative_position_bucket(
            relative, bidirectional=True, num_buckets=attention.relative_attention_num_buckets,
            max_distance=attention.relative_attention_max_distance)
        return attention.relative_attention_bias(buckets).permute(0, 3, 1, 2)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, labels: torch.LongTensor,
                allowed_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Mean token cross-entropy of `labels` [B, S]; the decoder reads them shifted right after start token 0.

        With `catalogue_softmax`, `allowed_tokens` [B, S, V] (`SidCatalogue.allowed_tokens(labels)`) says which tokens
        each position's softmax is over.
        """
        hidden_states, attention_mask = self.encode(input_ids, attention_mask)
        logits = self._sid_logits(hidden_states, attention_mask, labels, allowed_tokens)
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    def _sid_logits(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                    labels: torch.LongTensor, allowed_tokens: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, S, V] of the SIDs `labels` [B, S], teacher-forced through the stock T5 decoder and LM head;
        -inf outside `allowed_tokens` where the model has `catalogue_softmax`."""
        if self.catalogue_softmax != (allowed_tokens is not None):
            raise ValueError("allowed_tokens must be given exactly when the model has catalogue_softmax")
        logits = self.t5(encoder_outputs=(encoder_hidden_states,), attention_mask=encoder_attention_mask,
                         decoder_input_ids=self.t5.prepare_decoder_input_ids_from_labels(labels=labels),
                         use_cache=False).logits
        return logits if allowed_tokens is None else logits.masked_fill(~allowed_tokens, float("-inf"))

    def sid_log_probs(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                      labels: torch.LongTensor, allowed_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Each token's log-probability [B, S] in fp32 of the SIDs `labels` [B, S], teacher-forced through the stock
        T5 decoder and LM head on given encoder states: the reference the beam search is tested and judged against.
        Its softmax is over the vocabulary, or with `catalogue_softmax` over `allowed_tokens` [B, S, V] (as `forward`).
        """
        logits = self._sid_logits(encoder_hidden_states, encoder_attention_mask, labels, allowed_tokens).float()
        return logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)

    def cross_attention_keys_values(self, encoder_hidden_states: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Each decoder block's cross-attention keys, transposed [B, H, d_kv, T'] (ready for query @ keys), and values
        [B, H, T', d_kv], projected once per history."""
        keys_values = []
        for block in self.t5.decoder.block:
            attention = block.layer[1].EncDecAttention
            shape = (*encoder_hidden_states.shape[:2], attention.n_heads, attention.key_value_proj_dim)
            keys = attention.k(encoder_hidden_states).view(shape).permute(0, 2, 3, 1).contiguous()
            keys_values.append((keys, attention.v(encoder_hidden_states).view(shape).transpose(1, 2)))
        return keys_values

    def beam_step(self, tokens: torch.LongTensor, cache: BeamCache, cross_keys_values: list[tuple[torch.Tensor, ...]],
                  encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B * W, V'] of W beams per history, each fed its last token [B * W]; appends the beams'
        self-attention keys and values to `cache`. V' >= V: the vocabulary padded to a multiple of 16 tokens, whose
        padding has logits -inf (no share of any softmax). Eval mode only (no dropout).

        The stock decoder block by block, with its weights, but its attention written for one query per beam: the
        self-attention reads the beams' cached prefixes (at most the SID's length) from a cache that the search can
        split by beams (`BeamCache.select`), cross-attention groups the W beams of a history as W queries on that
        history's keys/values (`cross_attention_keys_values`), where the stock decoder would need them repeated W
        times. Equals the stock decoder (`sid_log_probs`; tested through the beam search's exactness).
        """
        if self.training:
            raise RuntimeError("Tiger.beam_step runs in eval mode (it applies no dropout)")
        decoder = self.t5.decoder
        batch_size = encoder_attention_mask.shape[0]
        hidden_states = decoder.embed_tokens(tokens)  # [R, d], R = B * W
        rows = hidden_states.shape[0]
        step = cache.length  # the query's position; the keys are at 0..step
        position_bias = decoder.block[0].layer[0].SelfAttention.compute_bias(
            1, step + 1, device=hidden_states.device, past_seen_tokens=step)[0, :, 0]  # [H, step + 1]
        # Additive: T5 has no 1/sqrt(d_kv) scaling and no cross-attention position bias; every history has a real token.
        cross_bias = torch.zeros(encoder_attention_mask.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        cross_bias = cross_bias.masked_fill(~encoder_attention_mask.bool(), torch.finfo(hidden_states.dtype).min)
        for block, (keys_t, values), past_keys, past_values in zip(decoder.block, cross_keys_values, cache.keys,
                                                                   cache.values):
            layer = block.layer[0]
            attention = layer.SelfAttention
            normed = layer.layer_norm(hidden_states)
            query, key, value = (projection(normed).view(rows, attention.n_heads, attention.key_value_proj_dim)
                                 for projection in (attention.q, attention.k, attention.v))
            past_keys.append(key)
            past_values.append(value)
            scores = torch.stack([(query * k).sum(dim=-1) for k in past_keys], dim=-1) + position_bias  # [R, H, t+1]
            probs = scores.softmax(dim=-1)
            attended = sum(probs[..., j, None] * v for j, v in enumerate(past_values))
            hidden_states = hidden_states + attention.o(attended.view(rows, -1))

            layer = block.layer[1]
            attention = layer.EncDecAttention
            query = attention.q(layer.layer_norm(hidden_states)).view(batch_size, -1, attention.n_heads,
                                                                      attention.key_value_proj_dim).transpose(1, 2)
            probs = (query @ keys_t + cross_bias[:, None, None, :]).softmax(dim=-1)  # [B, H, W, T']
            attended = (probs @ values).transpose(1, 2).reshape(rows, -1)
            hidden_states = hidden_states + attention.o(attended)
            hidden_states = block.layer[-1](hidden_states)
        hidden_states = decoder.final_layer_norm(hidden_states)
        if self.t5.config.scale_decoder_outputs:  # as T5ForConditionalGeneration (T5's d_model^-0.5)
            hidden_states = hidden_states * self.t5.config.d_model**-0.5
        # The LM head padded with zero rows to a multiple of 16 tokens: MKL's fp32 matmul runs this, the search's
        # largest product, 1.6x faster so (Beauty: 3025 -> 3040 tokens, 17 -> 11 ms; the whole search 1.026x).
        vocab_size = self.t5.config.vocab_size
        logits = hidden_states @ nn.functional.pad(self.t5.lm_head.weight, (0, 0, 0, -vocab_size % 16)).T
        logits[:, vocab_size:] = float("-inf")
        return logits
