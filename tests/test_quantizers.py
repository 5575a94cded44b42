import io
import math

import numpy as np
import pytest
import torch

import rastp.quantizers as rq
from rastp.config import ConfigError
from rastp.io import DataError
from rastp.quantizers import (DeadCodeReset, Quantized, ResidualQuantizer, Settings, Tokenizer, distinct_assign,
                              fit_codebook, gumbel_softmax, gumbel_temperature, load_quantizer, rq_loss,
                              sinkhorn_assign)

CPU = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second intra-op thread only adds synchronisation, which on a busy machine costs 10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**overrides) -> dict:
    cfg = {
        "method": "rqvae", "input_dim": 16, "levels": 2, "codebook_size": 8,
        "rqvae": {"hidden_dims": [32], "latent_dim": 4, "beta": 0.25, "quantize": "ste"},
        "gumbel": {"temperature": 2.0, "min_temperature": 0.05, "schedule": "exponential",
                   "update_every": 1},
        "standardize": True, "kmeans_init": True, "kmeans_iters": 10, "dead_code_steps": 20,
        "last_level": "nearest", "lr": 0.003, "batch_size": 64, "epochs": 15,
    }
    for key, value in overrides.items():
        node, *path = cfg, *key.split("__")
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return cfg


def clustered(n=256, dim=16, clusters=12, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)) * 3
    return (centers[rng.integers(clusters, size=n)] + rng.normal(size=(n, dim))).astype(np.float32)


# --------------------------------------------------------------------------- losses

def test_rq_loss_matches_hand_computed_values():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    x_hat = torch.zeros(2, 2)                              # per-item squared errors 5 and 0 -> recon 2.5
    r1, e1 = torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # 1 and 4 -> 2.5
    r2, e2 = torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # 0 and 1 -> 0.5
    q = Quantized(z_q=x_hat, codes=torch.zeros(2, 2, dtype=torch.long), residuals=[r1, r2], codewords=[e1, e2])
    out = rq_loss(x, x_hat, q, beta=0.25)
    assert out["recon"].item() == pytest.approx(2.5)
    assert out["codebook"].item() == pytest.approx(3.0)
    assert out["commit"].item() == pytest.approx(3.0)
    assert out["loss"].item() == pytest.approx(2.5 + 3.0 + 0.25 * 3.0)


def test_loss_terms_share_one_reduction():
    # The same per-coordinate error in equally wide spaces must weigh the same in both terms; a
    # per-dimension mean on reconstruction against a sum on the codebook terms would make it 384x weaker.
    dim = 384
    x, x_hat = torch.ones(3, dim), torch.zeros(3, dim)
    q = Quantized(z_q=x_hat, codes=torch.zeros(3, 1, dtype=torch.long), residuals=[torch.ones(3, dim)],
                  codewords=[torch.zeros(3, dim)])
    out = rq_loss(x, x_hat, q, beta=0.25)
    assert out["recon"].item() == pytest.approx(out["codebook"].item())
    assert out["recon"].item() == pytest.approx(dim)


def test_codebook_and_commitment_gradients_go_to_their_own_side():
    r = torch.tensor([[2.0, 0.0]], requires_grad=True)
    e = torch.tensor([[0.0, 0.0]], requires_grad=True)
    q = Quantized(z_q=r, codes=torch.zeros(1, 1, dtype=torch.long), residuals=[r], codewords=[e])
    rq_loss(torch.zeros(1, 2), torch.zeros(1, 2), q, beta=0.25)["loss"].backward()
    assert e.grad.tolist() == [[-4.0, 0.0]]   # d/de ||sg[r] - e||^2
    assert r.grad.tolist() == [[1.0, 0.0]]    # beta * d/dr ||r - sg[e]||^2


def test_straight_through_passes_decoder_gradient_to_encoder_unchanged():
    rqz = ResidualQuantizer(2, 4, 3, gradient_mode="ste")
    z = torch.randn(5, 3, requires_grad=True)
    out = rqz(z)
    torch.testing.assert_close(out.z_q, rqz.decode_codes(out.codes))
    (out.z_q * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(z.grad, torch.arange(3.0).expand(5, 3))
    assert rqz.codebooks.grad is None  # codebooks learn from the codebook loss only


# --------------------------------------------------------------------------- Gumbel-softmax

def schedule(name, update_every=1):
    # tau0 = 2 and floor = 1/8: over a run of 5 steps the exponential schedule halves the temperature at each step.
    return Settings.parse(config(gumbel__temperature=2.0, gumbel__min_temperature=0.125, gumbel__schedule=name,
                                 gumbel__update_every=update_every))


@pytest.mark.parametrize("name, expected", [
    ("exponential", [2.0, 1.0, 0.5, 0.25, 0.125, 0.125]),
    ("linear", [2.0, 1.53125, 1.0625, 0.59375, 0.125, 0.125]),
    ("cosine", [2.0, 0.125 + 1.875 * (1 + math.sqrt(0.5)) / 2, 1.0625, 0.125 + 1.875 * (1 - math.sqrt(0.5)) / 2,
                0.125, 0.125]),
])
def test_temperature_schedules_reach_the_floor_at_the_last_step(name, expected):
    s = schedule(name)
    assert [gumbel_temperature(t, 5, s) for t in [0, 1, 2, 3, 4, 10]] == pytest.approx(expected)
    # A run twice as long anneals half as fast: the same temperatures at the same fractions of the run.
    assert [gumbel_temperature(t, 9, s) for t in [0, 2, 4, 6, 8]] == pytest.approx(expected[:5])


def test_temperature_changes_every_update_every_steps():
    s = schedule("exponential", update_every=3)
    assert [gumbel_temperature(t, 7, s) for t in [0, 2, 3, 5, 6]] == pytest.approx([2.0, 2.0, 0.5, 0.5, 0.125])


def test_gumbel_softmax_divides_by_the_temperature_once():
    logits = torch.tensor([[0.0, -1.0, -4.0]])
    y = gumbel_softmax(logits, 0.5, generator=torch.Generator().manual_seed(3))
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(3))
    g = -torch.log(-torch.log(u))
    torch.testing.assert_close(y, torch.softmax((logits + g) / 0.5, -1))


def test_gumbel_outputs_become_one_hot_as_temperature_falls():
    logits = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    peak = [gumbel_softmax(logits, t, torch.Generator().manual_seed(1)).max(-1).values.mean().item()
            for t in [2.0, 0.5, 0.1, 0.01]]
    assert peak == sorted(peak)
    assert peak[0] < 0.6 and peak[-1] > 0.99


def test_gumbel_training_uses_soft_codewords_but_hard_argmin_codes():
    torch.manual_seed(0)
    rqz = ResidualQuantizer(1, 4, 3, gradient_mode="gumbel").train()
    z = torch.randn(10, 3)
    out = rqz(z, temperature=1.0)
    assert out.codes[:, 0].tolist() == torch.cdist(z, rqz.codebooks[0]).argmin(1).tolist()
    assert not torch.allclose(out.z_q, rqz.decode_codes(out.codes))  # a relaxation, not the hard codewords
    out.z_q.sum().backward()
    assert rqz.codebooks.grad is not None


# --------------------------------------------------------------------------- init, dead codes, Sinkhorn

@pytest.mark.parametrize("method", ["rqvae", "rvq"])
def test_kmeans_init_puts_every_code_on_a_residual(method):
    s = Settings.parse(config(method=method, standardize=False))
    model = Tokenizer(s)
    points = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    x = points.repeat(3, 1)  # 8 distinct items, each 3 times: k-means with K = 8 must sit on them
    model.init_codebooks(x, torch.Generator().manual_seed(0))
    residual = model.latent(x).detach()
    for codebook in model.quantizer.codebooks.detach():
        gap = torch.cdist(codebook, residual).min(1).values  # each code's distance to its closest residual
        assert gap.max() < 1e-5
        chosen = codebook[torch.cdist(residual, codebook).argmin(1)]
        residual = residual - chosen
    assert len(torch.unique(model.quantizer.codebooks[0].detach(), dim=0)) == 8


def test_dead_code_reset_leaves_no_code_unused():
    rqz = ResidualQuantizer(1, 4, 2, gradient_mode="direct").eval()
    with torch.no_grad():
        rqz.codebooks[0] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    batch = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]] * 3 + [[5.0, 5.0]])
    reset = DeadCodeReset(rqz, steps=2, generator=torch.Generator().manual_seed(0))
    assert reset(rqz(batch)) == 0          # unused once: not yet dead
    assert reset(rqz(batch)) == 1          # unused twice: re-seeded
    assert rqz.codebooks[0, 3].tolist() == [5.0, 5.0]  # onto the residual served worst
    assert sorted(torch.unique(rqz(batch).codes).tolist()) == [0, 1, 2, 3]
    assert reset.unused.tolist() == [[0, 0, 0, 0]]


def test_sinkhorn_balances_the_last_level():
    codebook = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    x = torch.linspace(-1.0, 0.4, 8).unsqueeze(1)  # every point is nearest to code 0
    d2 = torch.cdist(x, codebook).pow(2)
    assert d2.argmin(1).unique().tolist() == [0]
    assert torch.bincount(sinkhorn_assign(d2), minlength=4).tolist() == [2, 2, 2, 2]
    rqz = ResidualQuantizer(2, 4, 1, last_level="sinkhorn").eval()
    with torch.no_grad():
        rqz.codebooks[:] = torch.stack([torch.tensor([[0.0], [100.0], [200.0], [300.0]]), codebook])
    codes = rqz(x).codes
    assert codes[:, 0].unique().tolist() == [0]                     # earlier levels keep argmin
    assert torch.bincount(codes[:, 1], minlength=4).tolist() == [2, 2, 2, 2]
    assert rqz.train()(x).codes[:, 1].unique().tolist() == [0]      # final IDs only, not training steps


def test_distinct_last_level_separates_items_that_share_a_prefix():
    codebook = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    x = torch.tensor([[0.0], [0.1], [0.2], [2.9], [0.05], [0.0]])
    d2 = torch.cdist(x, codebook).pow(2)
    prefix = torch.tensor([[7], [7], [7], [7], [8], [9]])  # items 0-3 share a prefix; 4 and 5 are alone
    codes = distinct_assign(d2, prefix)
    # group 7: 0, 0.1, 0.2 all prefer code 0, 2.9 prefers 3: the least-distance distinct codes are 0, 1, 2, 3
    assert codes.tolist() == [0, 1, 2, 3, 0, 0]  # different prefixes may share a last code
    # the Hungarian optimum, not a greedy pass: total distance no larger than any other distinct assignment
    assert d2[torch.arange(4), codes[:4]].sum() <= d2[torch.arange(4), torch.tensor([1, 0, 2, 3])].sum()
    # a group larger than the codebook: as many distinct codes as there are, the rest keep their nearest
    crowd = torch.zeros(6, 1)
    crowd_codes = distinct_assign(torch.cdist(crowd, codebook).pow(2), torch.zeros(6, 1, dtype=torch.long))
    assert sorted(crowd_codes.tolist()) == [0, 0, 0, 1, 2, 3]
    # in the quantizer: the final IDs only, after nearest codes on the earlier levels
    rqz = ResidualQuantizer(2, 4, 1, last_level="distinct").eval()
    with torch.no_grad():
        rqz.codebooks[:] = torch.stack([torch.tensor([[0.0], [100.0], [200.0], [300.0]]), codebook])
    points = torch.tensor([[0.0], [0.1], [100.0], [100.1]])
    assert rqz(points).codes.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert rqz.train()(points).codes[:, 1].tolist() == [0, 0, 0, 0]


# --------------------------------------------------------------------------- training end to end

@pytest.mark.parametrize("overrides", [
    {"method": "rqvae", "epochs": 60},
    {"method": "rqvae", "epochs": 60, "lr": 0.01, "rqvae__quantize": "gumbel"},
    {"method": "rvq", "kmeans_init": False},
    {"method": "rqkmeans"},
])
def test_each_method_trains_and_lowers_reconstruction_error(overrides):
    x = clustered()
    result = fit_codebook(x, config(**overrides), seed=0, trainer=CPU, source="tiny.npy")
    report = result.report
    assert result.codes.shape == (256, 2) and result.codes.dtype == np.int64
    assert report["recon_mse"] < 0.6 * x.var(0).mean()  # far better than predicting the mean item
    if overrides["method"] == "rqkmeans":
        first_level = [row["inertia"] for row in result.history if row["level"] == 0]
        assert first_level[-1] < first_level[0]
    else:
        epochs = [row for row in result.history if "epoch" in row]  # after any k-means inertia rows
        assert epochs[-1]["recon"] < 0.7 * epochs[0]["recon"]
        assert {"step", "epoch", "loss", "recon", "codebook", "commit"} <= set(epochs[-1])
    assert len(report["usage"]) == len(report["perplexity"]) == 2
    assert all(0 < u <= 1 for u in report["usage"]) and all(1 <= p <= 8 for p in report["perplexity"])
    assert len(result.usage_rows) == 2 * 8
    assert sum(r["count"] for r in result.usage_rows if r["level"] == 0) == 256
    for level, usage in enumerate(report["usage"]):
        used = sum(r["count"] > 0 for r in result.usage_rows if r["level"] == level)
        assert usage == used / 8

    buffer = io.BytesIO()
    torch.save(result.state, buffer)
    buffer.seek(0)
    reloaded = load_quantizer(torch.load(buffer, weights_only=False))
    np.testing.assert_array_equal(reloaded.encode(x), result.codes)


def test_gumbel_history_records_the_annealed_temperature():
    result = fit_codebook(clustered(), config(rqvae__quantize="gumbel", epochs=3), seed=0, trainer=CPU)
    temperatures = [row["temperature"] for row in result.history if "temperature" in row]
    # 3 epochs of 4 batches: 12 steps, from 2.0 at step 0 to the floor 0.05 at step 11, recorded after each epoch.
    assert temperatures == pytest.approx([2.0 * 0.025 ** (4 / 11), 2.0 * 0.025 ** (8 / 11), 0.05])
    assert result.report["method"] == "rqvae-gumbel"


def test_same_seed_same_codes():
    x = clustered()
    a = fit_codebook(x, config(method="rvq", epochs=3), seed=7, trainer=CPU)
    b = fit_codebook(x, config(method="rvq", epochs=3), seed=7, trainer=CPU)
    np.testing.assert_array_equal(a.codes, b.codes)


def test_codebook_gradients_are_the_same_run_to_run_on_two_threads():
    # Indexing's backward (index_put_ with accumulate) summed a code's gradients in a thread-dependent order on CPU:
    # the pipeline's codebook came out different at every run. The lookup must not depend on the threads.
    generator = torch.Generator().manual_seed(0)
    quantizer = ResidualQuantizer(levels=2, codebook_size=16, dim=32).train()
    z = torch.randn(4096, 32, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(8):
            quantizer.zero_grad()
            q = quantizer(z)
            sum((r.detach() - e).pow(2).sum() for r, e in zip(q.residuals, q.codewords)).backward()  # the codebook loss
            grads.append(quantizer.codebooks.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert grads[0].abs().sum() > 0
    assert all(torch.equal(grads[0], grad) for grad in grads[1:])


def test_codebook_trains_in_fp32_whatever_trainer_precision_says():
    # trainer.precision is TIGER's: a bf16-mixed override used to reach the tokenizer and crash its dead-code reset.
    x = clustered()
    cfg = config(epochs=3, dead_code_steps=1)
    fp32 = fit_codebook(x, cfg, seed=7, trainer=CPU)
    bf16 = fit_codebook(x, cfg, seed=7, trainer={**CPU, "precision": "bf16-mixed"})
    assert sum(row["reseeded"] for row in bf16.history if "reseeded" in row) > 0  # the reset that crashed ran
    np.testing.assert_array_equal(bf16.codes, fp32.codes)


# --------------------------------------------------------------------------- bad input, before any training

@pytest.fixture
def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started before the input was checked")
    monkeypatch.setattr(rq, "_train", fail)
    monkeypatch.setattr(rq.Tokenizer, "init_codebooks", fail)


@pytest.mark.parametrize("method", ["rqvae", "rqkmeans"])
@pytest.mark.parametrize("make, overrides, error, message", [
    (lambda x: np.where(np.arange(len(x))[:, None] == 5, np.nan, x), {}, DataError, r"beauty.npy: 1 item.*non-finite.*row 5"),
    (lambda x: np.where(np.arange(len(x))[:, None] == 9, np.inf, x), {}, DataError, r"beauty.npy:.*non-finite.*row 9"),
    (lambda x: x[:5], {}, ConfigError, r"beauty.npy: 5 items are fewer than codebook_size.<dataset>=8"),
    (lambda x: x, {"codebook_size": 0}, ConfigError, r"codebook_size.<dataset> must be a positive number, got 0"),
    (lambda x: x, {"levels": 0}, ConfigError, r"codebook.levels must be a positive number, got 0"),
    (lambda x: x[:, :10], {}, ConfigError, r"beauty.npy: embeddings have width 10 but codebook.input_dim is 16"),
    (lambda x: x[0], {}, DataError, r"beauty.npy: expected a 2-d array"),
    (lambda x: x, {"rqvae__quantize": "hard"}, ConfigError, r"codebook.rqvae.quantize must be one of"),
    (lambda x: x, {"gumbel__schedule": "step"}, ConfigError, r"codebook.gumbel.schedule must be one of"),
    (lambda x: x, {"gumbel__min_temperature": 3.0}, ConfigError, r"codebook.gumbel.min_temperature"),
])
def test_bad_input_is_a_clear_error_before_training(no_training, method, make, overrides, error, message):
    cfg = config(**overrides)
    cfg["method"] = method
    with pytest.raises(error, match=message):
        fit_codebook(make(clustered()), cfg, seed=0, trainer=CPU, source="beauty.npy")


def test_unknown_method_and_missing_param_name_the_param(no_training):
    with pytest.raises(ConfigError, match=r"codebook.method must be one of"):
        fit_codebook(clustered(), config(method="vqvae"), seed=0)
    cfg = config()
    del cfg["kmeans_iters"]
    with pytest.raises(ConfigError, match=r"codebook.kmeans_iters is missing"):
        fit_codebook(clustered(), cfg, seed=0)
