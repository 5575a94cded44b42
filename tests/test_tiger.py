import math

import pytest
import torch
from transformers import T5Config
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.t5.modeling_t5 import T5DenseActDense

from types import SimpleNamespace

from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rastp.tiger import FeedForward, RastpConfig, Tiger, packed_dropout, select_tokens, tiger_attention

VOCAB, SID_LENGTH = 60, 3


def make_model(*, num_layers=3, dropout=0.0, seed=0, packed=True, tied=True, **rastp) -> Tiger:
    torch.manual_seed(seed)
    return Tiger(vocab_size=VOCAB, sid_length=SID_LENGTH, num_layers=num_layers, num_decoder_layers=2, d_model=32,
                 num_heads=4, d_kv=8, d_ff=64, dropout=dropout, tie_embeddings=tied, packed_dropout=packed,
                 rastp=rastp)


def make_batch(seed=1):
    """Five histories of 13 tokens with 13, 9, 4, 1 and 12 real tokens (right- and left-padded rows)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (5, 13), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    mask[3, 1:] = 0
    mask[4, :1] = 0
    labels = torch.randint(1, VOCAB, (5, SID_LENGTH), generator=generator)
    return input_ids * mask, mask, labels


def num_keep(mask, keep_ratio):
    return [max(1, math.ceil(round(keep_ratio * int(n), 9))) for n in mask.sum(dim=1)]


def stock_block_outputs(model, input_ids, mask):
    """Each stock encoder block's output and self-attention probabilities (eager attention), eval mode."""
    encoder = model.t5.encoder
    ours = model.t5.config._attn_implementation
    model.t5.set_attn_implementation("eager")
    attentions = encoder(input_ids=input_ids, attention_mask=mask, output_attentions=True).attentions
    model.t5.set_attn_implementation(ours)
    hidden, bias, outputs = encoder.embed_tokens(input_ids), None, []
    mask4d = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=mask)
    for block in encoder.block:
        hidden, bias, _ = block(hidden, mask4d, bias)
        outputs.append(hidden)
    return outputs, attentions


def test_config_validation():
    assert make_model(enabled=True).rastp == RastpConfig(enabled=True)
    with pytest.raises(ValueError, match="score"):
        RastpConfig(score="entropy")
    with pytest.raises(ValueError, match="keep_ratio"):
        RastpConfig(keep_ratio=0.0)
    with pytest.raises(ValueError, match="prune_layer"):
        make_model(prune_layer=4)
    with pytest.raises(ValueError, match="keep_ratio_of"):
        RastpConfig(keep_ratio_of="batch")
    with pytest.raises(ValueError, match="max_length needs the model's max_input_length"):
        make_model(enabled=True, keep_ratio_of="max_length")


@pytest.mark.parametrize("tied", [True, False])
def test_tie_embeddings_shares_or_separates_the_tables(tied):
    model = make_model(tied=tied).train()
    t5 = model.t5
    tables = [t5.encoder.embed_tokens.weight, t5.decoder.embed_tokens.weight, t5.lm_head.weight]
    assert len({id(table) for table in tables}) == (1 if tied else 3)
    # Untied, each table starts as the tied one: std 1, logits scaled by d_model^-0.5.
    assert all(abs(float(table.std()) - 1.0) < 0.1 for table in tables) and t5.config.scale_decoder_outputs
    input_ids, mask, labels = make_batch()
    model(input_ids, mask, labels).backward()
    assert all(p.grad is not None for p in model.parameters())  # no table left unused (DDP needs that)
    fed = set(input_ids[mask.bool()].tolist()) | set(labels[:, :-1].flatten().tolist())
    unseen = sorted(set(range(1, VOCAB)) - fed)
    # A token the encoder never reads and the decoder is never fed gets a gradient only through the output layer.
    assert (t5.encoder.embed_tokens.weight.grad[unseen].abs().sum() > 0) == tied
    assert t5.lm_head.weight.grad[unseen].abs().sum() > 0


def test_encoder_without_pruning_equals_stock_t5_encoder():
    input_ids, mask, _ = make_batch()
    for rastp in ({"enabled": False}, {"enabled": True, "at_eval": False}):  # eval mode: no pruning either way
        model = make_model(**rastp).eval()
        hidden, out_mask = model.encode(input_ids, mask)
        stock = model.t5.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        assert torch.equal(hidden, stock) and torch.equal(out_mask, mask)


def test_the_pruning_blocks_self_attention_hands_over_t5s_probabilities_before_dropout():
    """RASTP scores with the probabilities the block's own self-attention forms: eager T5's, and its output unchanged;
    in training they are the probabilities before dropout."""
    input_ids, mask, _ = make_batch()
    model = make_model(dropout=0.5).eval()
    outputs, attentions = stock_block_outputs(model, input_ids, mask)
    encoder = model.t5.encoder
    mask4d = create_bidirectional_mask(config=encoder.config, inputs_embeds=outputs[0], attention_mask=mask)
    bias = encoder.block[0].layer[0].SelfAttention.compute_bias(13, 13)
    for number in (0, 1):
        block = encoder.block[number]
        block_input = encoder.embed_tokens(input_ids) if number == 0 else outputs[number - 1]
        hidden, _, probs = block.layer[0](block_input, mask4d, bias, attention_probs=True)
        torch.testing.assert_close(probs, attentions[number])
        torch.testing.assert_close(block.layer[-1](hidden), outputs[number])
        block.train()
        hidden, _, probs = block.layer[0](block_input, mask4d, bias, attention_probs=True)
        block.eval()
        torch.testing.assert_close(probs, attentions[number])  # dropout hits the values' weights, not these
        assert not torch.allclose(block.layer[-1](hidden), outputs[number])  # while dropout did act


def test_select_tokens_keeps_top_k_real_tokens_in_order():
    _, mask, _ = make_batch()
    importance = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3))
    importance[mask == 0] = 100.0  # padding must lose even with the highest score
    for keep_ratio in (0.1, 0.3, 0.5, 0.77, 1.0):
        index, kept = select_tokens(importance, mask, keep_ratio)
        counts = num_keep(mask, keep_ratio)
        assert index.shape == kept.shape == (5, max(counts))
        for row, count in enumerate(counts):
            real = mask[row].nonzero().flatten()
            top = real[importance[row, real].topk(count).indices].sort().values
            assert torch.equal(index[row, :count], top)  # the top-k, in original order
            assert kept[row, :count].all() and not kept[row, count:].any()


def test_select_tokens_with_a_max_length_budget_prunes_only_the_longer_rows():
    _, mask, _ = make_batch()  # 13, 9, 4, 1 and 12 real tokens
    importance = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3))
    importance[mask == 0] = 100.0
    index, kept = select_tokens(importance, mask, 0.3, max_length=20)  # a budget of ceil(0.3 * 20) = 6 tokens
    counts = [6, 6, 4, 1, 6]
    assert index.shape == kept.shape == (5, 6)
    for row, count in enumerate(counts):
        real = mask[row].nonzero().flatten()
        top = real[importance[row, real].topk(count).indices].sort().values
        assert torch.equal(index[row, :count], top)  # rows 2 and 3 keep all their real tokens
        assert kept[row, :count].all() and not kept[row, count:].any()


def test_select_tokens_keeps_no_padding_even_in_a_row_of_padding_only():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    importance = torch.tensor([[1.0, 3.0, 2.0, 9.0], [5.0, 6.0, 7.0, 8.0]])
    for max_length in (None, 4):
        index, kept = select_tokens(importance, mask, 0.5, max_length=max_length)
        assert index[0].tolist() == [1, 2] and kept[0].all()
        assert not kept[1].any()  # nothing real to keep: the row stays wholly masked
    index, kept = select_tokens(importance[1:], mask[1:], 0.5)  # a batch of padding only keeps one masked column
    assert kept.shape == (1, 1) and not kept.any()


def test_a_row_within_the_max_length_budget_is_not_pruned():
    """keep_ratio_of=max_length: a history no longer than the budget keeps every token and gets the unpruned model's
    encoding; a longer one is cut to the budget."""
    input_ids, mask, _ = make_batch()  # 13, 9, 4, 1 and 12 real tokens
    torch.manual_seed(0)
    pruned = Tiger(vocab_size=VOCAB, sid_length=SID_LENGTH, num_layers=3, num_decoder_layers=2, d_model=32,
                   num_heads=4, d_kv=8, d_ff=64, dropout=0.0, max_input_length=16,
                   rastp={"enabled": True, "prune_layer": 1, "keep_ratio": 0.5, "keep_ratio_of": "max_length"})
    unpruned = make_model().eval()
    hidden, out_mask = pruned.eval().encode(input_ids, mask)
    assert out_mask.sum(dim=1).tolist() == [8, 8, 4, 1, 8]
    reference = unpruned.encode(input_ids, mask)[0]
    for row in (2, 3):
        torch.testing.assert_close(hidden[row][out_mask[row] == 1], reference[row][mask[row] == 1])


@pytest.mark.parametrize("score", ["rastp", "norm", "attention", "random"])
def test_pruning_keeps_top_k_by_score(score):
    """Pruning after the last block: the output is the stock output at the top-k tokens by `score`."""
    input_ids, mask, _ = make_batch()
    model = make_model(enabled=True, at_eval=True, prune_layer=3, keep_ratio=0.4, score=score).eval()
    model.generator = torch.Generator().manual_seed(7)
    outputs, attentions = stock_block_outputs(model, input_ids, mask)
    received = torch.einsum("bhqk,bq->bk", attentions[2], mask.float())
    norm = outputs[2].norm(dim=-1)
    importance = {"rastp": received * norm, "attention": received, "norm": norm,
                  "random": torch.rand(mask.shape, generator=torch.Generator().manual_seed(7))}[score]
    hidden, out_mask = model.encode(input_ids, mask)
    stock = model.t5.encoder.final_layer_norm(outputs[2])
    counts = num_keep(mask, 0.4)
    assert hidden.shape == (5, max(counts), 32) and out_mask.tolist() == [
        [1] * c + [0] * (max(counts) - c) for c in counts]
    for row, count in enumerate(counts):
        real = mask[row].nonzero().flatten()
        top = real[importance[row, real].topk(count).indices].sort().values
        torch.testing.assert_close(hidden[row, :count], stock[row, top])


def test_attention_scores_need_tigers_attention():
    input_ids, mask, _ = make_batch()
    model = make_model(enabled=True, at_eval=True)
    model.t5.set_attn_implementation("sdpa")  # hands over no probabilities
    with pytest.raises(RuntimeError, match="tiger.rastp.score=rastp .* 'sdpa'"):
        model.eval().encode(input_ids, mask)
    model.rastp.score = "norm"  # needs none
    assert model.encode(input_ids, mask)[0].shape[1] == max(num_keep(mask, 0.34))


def test_later_blocks_run_on_shorter_tensors():
    input_ids, mask, labels = make_batch()
    model = make_model(enabled=True, prune_layer=1, keep_ratio=0.5).train()
    widths = []
    for block in model.t5.encoder.block:  # each block's self-attention and feed-forward
        for layer in (block.layer[0], block.layer[-1]):
            layer.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    cross_widths = []
    model.t5.decoder.block[0].layer[1].register_forward_pre_hook(
        lambda module, args, kwargs: cross_widths.append(kwargs["key_value_states"].shape[1]), with_kwargs=True)
    loss = model(input_ids, mask, labels)
    loss.backward()
    width = max(num_keep(mask, 0.5))
    assert widths == [13, 13, width, width, width, width] and cross_widths == [width]
    assert torch.isfinite(loss)
    _, out_mask = model.encode(input_ids, mask)
    assert out_mask.sum(dim=1).tolist() == num_keep(mask, 0.5)


def test_keep_ratio_one_equals_unpruned_model():
    input_ids, mask, labels = make_batch()
    mask[1:, -1], mask[0, 0] = 0, 0  # no row is full: the pruned width (12) is shorter than the input (13)
    unpruned, pruned = make_model().train(), make_model(enabled=True, keep_ratio=1.0, prune_layer=1).train()
    hidden, out_mask = pruned.encode(input_ids, mask)
    assert hidden.shape[1] == 12
    reference = unpruned.encode(input_ids, mask)[0]
    for row in range(5):
        torch.testing.assert_close(hidden[row][out_mask[row] == 1], reference[row][mask[row] == 1])
    torch.testing.assert_close(pruned(input_ids, mask, labels), unpruned(input_ids, mask, labels))


@pytest.mark.parametrize("catalogue_softmax", [False, True])
def test_training_loss_is_the_mean_negative_log_probability_of_the_labels(catalogue_softmax):
    """`forward`'s loss is what `sid_log_probs` (the beam search's reference) scores the same labels: over the
    vocabulary, or over each position's allowed tokens only."""
    torch.manual_seed(0)
    model = Tiger(vocab_size=VOCAB, sid_length=SID_LENGTH, num_layers=2, num_decoder_layers=2, d_model=32,
                  num_heads=4, d_kv=8, d_ff=64, dropout=0.0, catalogue_softmax=catalogue_softmax).eval()
    input_ids, mask, labels = make_batch()
    allowed = None
    if catalogue_softmax:
        allowed = torch.rand(*labels.shape, VOCAB, generator=torch.Generator().manual_seed(2)) < 0.2
        allowed.scatter_(2, labels[..., None], True)
    loss = model(input_ids, mask, labels, allowed)
    log_probs = model.sid_log_probs(*model.encode(input_ids, mask), labels, allowed)
    torch.testing.assert_close(loss, -log_probs.mean())
    model.catalogue_softmax = False
    vocabulary_loss = -model.sid_log_probs(*model.encode(input_ids, mask), labels).mean()
    assert (loss < vocabulary_loss - 0.1) == catalogue_softmax  # fewer tokens share each softmax


def test_keep_positions_uses_original_positions():
    """Gathering the kept tokens with their original positions equals masking the dropped ones out of the
    full-length sequence in the later blocks; compact positions (the published code's behaviour) differ."""
    input_ids, mask, _ = make_batch()
    model = make_model(enabled=True, at_eval=True, prune_layer=1, keep_ratio=0.5).eval()
    encoder = model.t5.encoder
    outputs, attentions = stock_block_outputs(model, input_ids, mask)
    importance = torch.einsum("bhqk,bq->bk", attentions[0], mask.float()) * outputs[0].norm(dim=-1)
    index, kept = select_tokens(importance, mask, 0.5)
    kept_mask = torch.zeros_like(mask).scatter(1, index, kept.long())
    hidden, bias = outputs[0], encoder.block[0].layer[0].SelfAttention.compute_bias(13, 13)
    mask4d = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=kept_mask)
    for block in encoder.block[1:]:
        hidden, _, _ = block(hidden, mask4d, bias)
    masked_reference = encoder.final_layer_norm(hidden).gather(1, index[..., None].expand(-1, -1, 32))

    pruned, out_mask = model.encode(input_ids, mask)
    assert torch.equal(out_mask, kept.long())
    torch.testing.assert_close(pruned[kept], masked_reference[kept])

    model.rastp.keep_positions = False
    compact, _ = model.encode(input_ids, mask)
    assert not torch.allclose(compact[kept], masked_reference[kept], atol=1e-3)


def test_pruning_only_at_eval_when_asked():
    input_ids, mask, _ = make_batch()
    model = make_model(enabled=True, keep_ratio=0.5, at_eval=False)
    assert model.train().encode(input_ids, mask)[0].shape[1] == max(num_keep(mask, 0.5))
    assert model.eval().encode(input_ids, mask)[0].shape[1] == 13
    model.rastp.at_eval = True
    assert model.encode(input_ids, mask)[0].shape[1] == max(num_keep(mask, 0.5))


def test_pruning_stops_after_until_and_training_then_reads_whole_histories():
    input_ids, mask, labels = make_batch()
    model = make_model(enabled=True, keep_ratio=0.5, until=0.8).train()
    unpruned = make_model(enabled=False).train()
    pruned_width = max(num_keep(mask, 0.5))
    for progress, width in ((0.0, pruned_width), (0.79, pruned_width), (0.8, 13), (0.95, 13)):
        model.set_training_progress(progress)
        assert model.encode(input_ids, mask)[0].shape[1] == width, progress
    torch.testing.assert_close(model(input_ids, mask, labels), unpruned(input_ids, mask, labels))  # past `until`
    model.eval()  # evaluation follows `at_eval` alone, wherever training stopped
    assert model.encode(input_ids, mask)[0].shape[1] == pruned_width
    with pytest.raises(ValueError, match="until"):
        RastpConfig(until=1.5)


def test_packed_dropout_drops_a_fraction_p_and_keeps_the_mean():
    x = torch.ones(400_000)
    torch.manual_seed(0)
    out = packed_dropout(x, 0.1, training=True)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.003
    # each of the four 16-bit slices of a random word drops at rate p (a 63-bit draw would never drop the 4th)
    for rate in dropped.view(-1, 4).float().mean(dim=0):
        assert abs(rate.item() - 0.1) < 0.005
    assert torch.allclose(out[~dropped], torch.full_like(out[~dropped], 1 / 0.9), rtol=1e-4)
    assert abs(out.mean().item() - 1.0) < 0.01
    assert not torch.equal(dropped, packed_dropout(x, 0.1, training=True) == 0)  # a fresh mask per call
    torch.manual_seed(0)
    assert torch.equal(packed_dropout(x, 0.1, training=True), out)  # seeded by torch's generator
    assert packed_dropout(x, 0.1, training=False) is x and packed_dropout(x, 0.0, training=True) is x
    assert torch.equal(packed_dropout(x, 1.0, training=True), torch.zeros_like(x))


def attention_inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 3, 5, 4, generator=generator).to(dtype) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5, generator=generator).to(dtype)
    padding = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]
    return query, key, value, bias, padding


def attention_module(causal: bool, packed: bool = True) -> SimpleNamespace:
    return SimpleNamespace(is_causal=causal, training=True, config=SimpleNamespace(packed_dropout=packed))


def test_packed_dropout_attention_equals_sdpa_when_nothing_drops():
    # p = 1e-9 takes the packed path but rounds to "drop nothing": the same attention as SDPA without dropout
    query, key, value, bias, padding = attention_inputs()
    for mask, causal in ((None, True), (None, False), (padding, False), (padding.float().log(), False)):
        module = attention_module(causal)
        ours, weights = tiger_attention(module, query, key, value, mask, dropout=1e-9, scaling=1.0, position_bias=bias)
        assert weights is not None  # formed here, not by SDPA
        stock, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=1.0, position_bias=bias)
        torch.testing.assert_close(ours, stock)


def test_bf16_training_attention_is_formed_by_matmuls_with_sdpa_values_and_gradients():
    query, key, value, bias, padding = attention_inputs(torch.bfloat16)
    for mask, causal in ((None, True), (padding, False)):
        module = attention_module(causal)
        inputs = [t.clone().requires_grad_() for t in (query, key, value, bias)]
        ours, weights = tiger_attention(module, *inputs[:3], mask, scaling=1.0, position_bias=inputs[3])
        assert weights is not None and weights.dtype == torch.bfloat16  # formed here, in bf16
        ours.float().square().sum().backward()
        reference = [t.float().requires_grad_() for t in (query, key, value, bias)]  # SDPA in fp32
        stock, _ = sdpa_attention_forward(module, *reference[:3], mask, scaling=1.0, position_bias=reference[3])
        stock.square().sum().backward()
        torch.testing.assert_close(ours.float(), stock, atol=0.05, rtol=0.05)
        for a, b in zip(inputs, reference):
            torch.testing.assert_close(a.grad.float(), b.grad, atol=0.1, rtol=0.05)
    # SDPA stays where it is the faster: without gradients, and in fp32 without dropout
    with torch.no_grad():
        assert tiger_attention(attention_module(False), query, key, value, padding, scaling=1.0)[1] is None
    fp32 = [t.float().requires_grad_() for t in (query, key, value)]
    assert tiger_attention(attention_module(False), *fp32, padding, scaling=1.0)[1] is None
    # and so does torch's dropout, for a model without packed dropout
    assert tiger_attention(attention_module(False, packed=False), *fp32, padding, dropout=0.1, scaling=1.0)[1] is None


def test_feed_forward_equals_t5s_bit_for_bit_in_fp32_and_under_bf16_autocast():
    torch.manual_seed(0)
    stock = T5DenseActDense(T5Config(d_model=32, d_ff=64, dropout_rate=0.0, feed_forward_proj="relu"))
    ours = FeedForward(stock)  # the same weights
    x = torch.randn(4, 7, 32)
    for bf16 in (False, True):
        outputs, grads = [], []
        for module in (stock, ours):
            module.zero_grad()
            inputs = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = module(inputs)
            out.float().square().sum().backward()
            outputs.append(out)
            grads.append((inputs.grad, module.wi.weight.grad, module.wo.weight.grad))
        assert outputs[1].dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert torch.equal(*outputs) and outputs[0].abs().sum() > 0
        assert all(torch.equal(a, b) for a, b in zip(*grads))
    model = make_model()
    assert all(isinstance(block.layer[-1].DenseReluDense, FeedForward)
               for block in (*model.t5.encoder.block, *model.t5.decoder.block))


def test_packed_dropout_model_trains_like_the_stock_dropout_model():
    input_ids, mask, labels = make_batch()
    packed, stock = make_model(dropout=1e-9).train(), make_model(dropout=1e-9, packed=False).train()
    assert not any(type(m) is torch.nn.Dropout for m in packed.modules())
    losses = [model(input_ids, mask, labels) for model in (packed, stock)]
    torch.testing.assert_close(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for a, b in zip(packed.parameters(), stock.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    # with real dropout, training-mode outputs are random and eval-mode outputs deterministic
    noisy = make_model(dropout=0.3)
    assert not torch.equal(noisy.train()(input_ids, mask, labels), noisy(input_ids, mask, labels))
    noisy.eval()
    assert torch.equal(noisy(input_ids, mask, labels), noisy(input_ids, mask, labels))
