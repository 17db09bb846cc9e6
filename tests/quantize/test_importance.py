"""Importance scores: LIM, ZD (both directions), candidate proxy losses with exact stored bits, and the output
sensitivity that puts the proxy losses of different layers into one currency."""

import pytest
import torch
from tinymodels import tiny_llama

from lowbit_compile.calibrate import CalibrationSummary
from lowbit_compile.errors import LowbitError
from lowbit_compile.quantize.importance import (
    lim_score,
    lim_scores,
    measure_candidates,
    output_energy,
    output_sensitivity,
    ranking,
    zd_score,
    zd_scores,
)
from lowbit_compile.recipe import parse_spec


def test_lim_is_one_minus_cosine_averaged_over_every_token():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # 2 tokens, hidden 2
    same, orth, opposite = x.clone(), x.flip(-1), -x
    assert lim_score([x], [same]) == pytest.approx(0.0)
    assert lim_score([x], [orth]) == pytest.approx(1.0)
    assert lim_score([x], [opposite]) == pytest.approx(2.0)
    # token-weighted over batches: 2 tokens with LIM 0 and 2 with LIM 2
    assert lim_score([x, x], [same, opposite]) == pytest.approx(1.0)
    with pytest.raises(LowbitError, match="one shape"):
        lim_score([x], [x[..., :1]])


def test_lim_scores_come_from_the_calibration_summary():
    s = CalibrationSummary(lim={"layers.0": 0.1, "layers.1": 0.3})
    assert lim_scores(s) == {"layers.0": 0.1, "layers.1": 0.3} == lim_scores(s.as_dict())
    with pytest.raises(LowbitError, match="no LIM scores"):
        lim_scores(CalibrationSummary())


def test_zd_is_the_share_of_weights_beyond_one_standard_deviation_within_each_matrix():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0]])  # only the 10 is beyond 1 std
    assert zd_score([w]) == pytest.approx(1 / 8)
    assert zd_score([w, 100 * w]) == pytest.approx(1 / 8)  # scale-free per matrix
    g = torch.Generator().manual_seed(0)
    assert zd_score([torch.randn(400, 400, generator=g)]) == pytest.approx(0.3173, abs=0.005)  # Gaussian
    scores = zd_scores(tiny_llama())
    assert list(scores) == ["model.layers.0", "model.layers.1"] and all(0 < v < 1 for v in scores.values())


def test_ranking_reports_both_directions():
    scores = {"b0": 0.2, "b1": 0.5, "b2": 0.1}
    assert ranking(scores) == ["b1", "b0", "b2"]
    assert ranking(scores, important="low") == ["b2", "b0", "b1"]
    with pytest.raises(LowbitError, match="'high' or 'low'"):
        ranking(scores, important="up")


def test_candidates_report_exact_stored_bits_and_the_proxy_loss_falls_with_bits():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    x = torch.randn(200, 40, generator=g, dtype=torch.float64)
    h = x.T @ x / 200
    specs = {n: parse_spec(n) for n in ("w2-rtn", "w3-rtn", "w4-rtn", "w2-quip")}
    results, records = measure_candidates("l", w, h, specs)
    for name, r in results.items():
        rec = records[name]
        assert r.bits == rec.qweight.numel() * 8 + rec.scales.numel() * 16 + (
            0 if rec.su is None else 40 + 24)  # codes + float16 scales + sign bits
        d = (rec.dequantized_weight().double() - w.double())
        assert r.proxy_loss == pytest.approx(float(((d @ h) * d).sum()), rel=1e-4)
    assert results["w2-rtn"].proxy_loss > results["w3-rtn"].proxy_loss > results["w4-rtn"].proxy_loss
    assert results["w2-quip"].proxy_loss < results["w2-rtn"].proxy_loss
    assert output_energy(w, h) == pytest.approx(float(torch.trace(w.double() @ h @ w.double().T)))


def test_fine_tuned_candidates_count_their_sign_vectors_as_they_will_be_stored():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    x = torch.randn(200, 40, generator=g, dtype=torch.float64)
    h = x.T @ x / 200
    results, records = measure_candidates("l", w, h, {n: parse_spec(n) for n in ("w2-e8", "w2-e8-ft")})
    assert torch.equal(records["w2-e8"].qweight, records["w2-e8-ft"].qweight)
    # fine-tuning makes su and sv real: float16, 16 bits an entry where the measured record holds ±1 (1 bit)
    assert results["w2-e8-ft"].bits == results["w2-e8"].bits + 15 * (40 + 24)


class _TwoLayer(torch.nn.Module):
    """y = W2 W1 x per token, plus a side branch that never reaches the output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second, self.side = torch.nn.Linear(8, 6), torch.nn.Linear(6, 5), torch.nn.Linear(8, 3)

    def forward(self, x):
        self.side(x)
        return self.second(self.first(x))


def test_output_sensitivity_turns_a_proxy_loss_into_the_output_error_it_causes():
    model = _TwoLayer()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 8, generator=g) for _ in range(3)]
    s = output_sensitivity(model, batches, ["first", "second", "side"], probes=400)
    assert s["side"] == 0.0
    w2 = model.second.weight.detach()
    tokens = 4
    assert s["first"] == pytest.approx(tokens * float(w2.square().sum()) / 6, rel=0.1)  # E||W2ᵀr||² / d
    assert s["second"] == pytest.approx(tokens * 1.0, rel=0.1)  # the output itself: E||r||² / d = 1 per token
    # an isotropic weight error on `first`: output squared error per batch ≈ s × proxy loss
    x = torch.cat(batches)
    h = (x.T.double() @ x.double()) / x.shape[0]
    errs, preds = [], []
    for _ in range(200):
        dw = torch.randn(6, 8, generator=g, dtype=torch.float64) * 0.01
        errs.append(float((x.double() @ dw.T @ w2.double().T).square().sum()) / len(batches))
        preds.append(s["first"] * float(((dw @ h) * dw).sum()))
    assert sum(errs) / len(errs) == pytest.approx(sum(preds) / len(preds), rel=0.15)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    with pytest.raises(LowbitError, match="at least one calibration batch"):
        output_sensitivity(model, [], ["first"])
