"""Hand-worked values of every function in `trinity_dpo.losses`: each docstring carries the arithmetic, and the test
asserts the number written there. Notation: c, r = chosen / rejected log-ratios (policy - reference), delta = chosen
score - rejected score, z = beta * delta, L(z) = -log sigmoid(z) = log(1 + e^-z), eps = label smoothing.
Useful identities: L(-z) = z + L(z); sigmoid(ln 3) = 3/4; sigmoid(2 ln 3) = 9/10."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trinity_dpo.objective.losses import (DPO_LOSS_TYPES, PairTerms, cpo_loss, dpo_loss, f_divergence_scores, log1mexp,
                                orpo_log_odds, wpo_weights)

LN2, LN3 = math.log(2), math.log(3)
ATOL = 1e-8  # float64 throughout, so the 8-digit literals are the binding precision


def T(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected) -> bool:
    return torch.allclose(actual, T(expected), rtol=0.0, atol=ATOL)


def terms(pc, pr, rc, rr, chosen_scores, rejected_scores, chosen_tokens=None, rejected_tokens=None,
          chosen_nll=None) -> PairTerms:
    """Pairs from policy (pc, pr) and reference (rc, rr) log-probs; the reverse-KL scores are written out by hand."""
    n = len(pc)
    return PairTerms(T(pc), T(pr), T(rc), T(rr), T(chosen_scores), T(rejected_scores),
                     T(chosen_tokens or [1.0] * n), T(rejected_tokens or [1.0] * n), T(chosen_nll or [0.0] * n))


# One pair: policy (-1, -3), reference (-2, -2): c = 1, r = -1, delta = 2; beta = 0.5 gives z = 1.
ONE = dict(pc=[-1.0], pr=[-3.0], rc=[-2.0], rr=[-2.0], chosen_scores=[1.0], rejected_scores=[-1.0])
# Pairs with c = 2 ln 3, r = -2 ln 3 (references -2 and -1): with beta = 0.5, beta c = ln 3 and beta r = -ln 3.
LN3_PAIR = dict(pc=[-2.0 + 2 * LN3], pr=[-1.0 - 2 * LN3], rc=[-2.0], rr=[-1.0],
                chosen_scores=[2 * LN3], rejected_scores=[-2 * LN3])


@pytest.mark.parametrize("eps, expected", [(0.0, 0.31326169), (0.25, 0.56326169)])
def test_sigmoid(eps, expected):
    """z = 0.5 * (1 - (-1)) = 1. eps = 0: L(1) = log(1 + e^-1) = 0.31326169.
    Conservative DPO, eps = 0.25: 0.75 L(1) + 0.25 L(-1) = 0.75 L(1) + 0.25 (1 + L(1)) = L(1) + 0.25 = 0.56326169."""
    assert close(dpo_loss("sigmoid", terms(**ONE), beta=0.5, label_smoothing=eps), [expected])


def test_hinge():
    """delta = [2, 1, -2], beta = 0.5: relu(1 - 0.5 delta) = [relu(0), relu(0.5), relu(2)] = [0, 0.5, 2]."""
    t = terms([1.0, 0.5, -1.0], [-1.0, -0.5, 1.0], [0.0] * 3, [0.0] * 3, [1.0, 0.5, -1.0], [-1.0, -0.5, 1.0])
    assert close(dpo_loss("hinge", t, beta=0.5), [0.0, 0.5, 2.0])


# Scores divided by token counts (clamped to >= 1): pair 1: 4/4 - (-2)/2 = 2; pair 2: 3/max(0,1) - 0/5 = 3.
NORM = dict(pc=[4.0, 3.0], pr=[-2.0, 0.0], rc=[0.0, 0.0], rr=[0.0, 0.0], chosen_scores=[4.0, 3.0],
            rejected_scores=[-2.0, 0.0], chosen_tokens=[4.0, 0.0], rejected_tokens=[2.0, 5.0])


def test_ipo_per_token():
    """norm = [4/4 - (-2)/2, 3/1 - 0/5] = [2, 3]; beta = 0.5, 1/(2 beta) = 1: (norm - 1)^2 = [1, 4]."""
    assert close(dpo_loss("ipo", terms(**NORM), beta=0.5), [1.0, 4.0])


def test_sigmoid_norm_per_token():
    """norm = [2, 3] (as for ipo), beta = 0.5: z = [1, 1.5]:
    L(1) = 0.31326169, L(1.5) = log(1 + e^-1.5) = 0.20141328."""
    assert close(dpo_loss("sigmoid_norm", terms(**NORM), beta=0.5), [0.31326169, 0.20141328])


def test_exo_pair():
    """eps = 0.25, beta = 0.5, delta = [0, 2 ln 3] so z = [0, ln 3]; loss = KL([q_w, q_l] || [0.75, 0.25]).
    z = 0: q = [1/2, 1/2]: 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = -ln 2 - 0.5 ln(0.1875) = 0.14384104.
    z = ln 3: q = [3/4, 1/4] = target, so KL = 0."""
    t = terms([0.0, 2 * LN3], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 2 * LN3], [0.0, 0.0])
    assert close(dpo_loss("exo_pair", t, beta=0.5, label_smoothing=0.25), [0.14384104, 0.0])


def test_nca_pair():
    """beta c = ln 3, beta r = -ln 3: -log s(ln 3) - 0.5 log s(-ln 3) - 0.5 log s(ln 3)
    = -1.5 ln(3/4) - 0.5 ln(1/4) = 1.5 * 0.28768207 + ln 2 = 1.12467029."""
    assert close(dpo_loss("nca_pair", terms(**LN3_PAIR), beta=0.5), [1.12467029])


def test_robust():
    """z = 1, eps = 0.25: (-0.75 log s(1) + 0.25 log s(-1)) / (1 - 0.5) = (0.75 L(1) - 0.25 (1 + L(1))) / 0.5
    = L(1) - 0.5 = 0.31326169 - 0.5 = -0.18673831."""
    assert close(dpo_loss("robust", terms(**ONE), beta=0.5, label_smoothing=0.25), [-0.18673831])


def test_bco_pair():
    """beta c = ln 3, beta r = -ln 3: -log s(ln 3) - log s(ln 3) = -2 ln(3/4) = 0.57536414."""
    assert close(dpo_loss("bco_pair", terms(**LN3_PAIR), beta=0.5), [0.57536414])


def test_sppo_hard():
    """policy (1, -3), reference (-2, -4): c = 3, r = 1; beta = 0.5, 0.5/beta = 1: (3 - 1)^2 + (1 + 1)^2 = 8."""
    t = terms([1.0], [-3.0], [-2.0], [-4.0], [3.0], [1.0])
    assert close(dpo_loss("sppo_hard", t, beta=0.5), [8.0])


def test_aot_sorts_margins_across_the_batch():
    """Policy margins pc - pr = [-1 - (-4), -3 - (-2)] = [3, -1]; reference margins rc - rr = [0, 2].
    Sorted: [-1, 3] - [0, 2] = [-1, 1] (unsorted it would be [3, -3]). beta = 1:
    [L(-1), L(1)] = [1 + 0.31326169, 0.31326169] = [1.31326169, 0.31326169]."""
    t = terms([-1.0, -3.0], [-4.0, -2.0], [-2.0, -1.0], [-2.0, -3.0], [1.0, -2.0], [-2.0, 1.0])
    assert close(dpo_loss("aot", t, beta=1.0), [1.31326169, 0.31326169])


def test_aot_unpaired_sorts_log_ratios_across_the_batch():
    """c = [2, -1], r = [-1, 0] (policy c + 1, r + 1 against references 1). Sorted: [-1, 2] - [-1, 0] = [0, 2]
    (unsorted [3, -1]). beta = 0.5, eps = 0.25: z = [0, 1]: [ln 2 (any eps), L(1) + 0.25] = [0.69314718, 0.56326169]."""
    t = terms([3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [2.0, -1.0], [-1.0, 0.0])
    assert close(dpo_loss("aot_unpaired", t, beta=0.5, label_smoothing=0.25), [0.69314718, 0.56326169])


def test_apo_zero():
    """beta c = ln 3, beta r = -ln 3: (1 - s(ln 3)) + s(-ln 3) = 1/4 + 1/4 = 0.5."""
    assert close(dpo_loss("apo_zero", terms(**LN3_PAIR), beta=0.5), [0.5])


def test_apo_down():
    """beta c = ln 3, beta (c - r) = 2 ln 3: s(ln 3) + (1 - s(2 ln 3)) = 3/4 + (1 - 9/10) = 0.85."""
    assert close(dpo_loss("apo_down", terms(**LN3_PAIR), beta=0.5), [0.85])


def test_discopop():
    """loss = L(z) (1 - m) + e^-z m with m = s(z / tau). tau = 1, z = [0, ln 3] (beta = 0.5, delta = [0, 2 ln 3]):
    z = 0: m = 1/2: 0.5 ln 2 + 0.5 = 0.84657359; z = ln 3: m = 3/4: 0.25 ln(4/3) + 0.75/3 = 0.32192052.
    Default tau = 0.05, z = 2: m = s(40) = 1 - 4e-18, so loss = e^-2 = 0.13533528."""
    t = terms([0.0, 2 * LN3], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 2 * LN3], [0.0, 0.0])
    assert close(dpo_loss("discopop", t, beta=0.5, discopop_tau=1.0), [0.84657359, 0.32192052])
    assert close(dpo_loss("discopop", terms(**ONE), beta=1.0), [0.13533528])


def test_sft_returns_chosen_nll():
    """sft ignores the log-ratios: loss = chosen_nll = [0.7, 1.3]."""
    t = terms([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0], [1.0, 0.0], [-1.0, 1.0],
              chosen_nll=[0.7, 1.3])
    assert close(dpo_loss("sft", t, beta=0.5), [0.7, 1.3])


@pytest.mark.parametrize("loss_type, eps, expected", [
    ("sigmoid", 0.0, LN2), ("sigmoid", 0.1, LN2), ("sigmoid", 0.4, LN2), ("robust", 0.2, LN2),
    ("sigmoid_norm", 0.0, LN2), ("aot", 0.3, LN2), ("aot_unpaired", 0.3, LN2),
    ("nca_pair", 0.0, 2 * LN2), ("bco_pair", 0.0, 2 * LN2), ("apo_zero", 0.0, 1.0), ("apo_down", 0.0, 1.0)])
def test_policy_equal_to_reference(loss_type, eps, expected):
    """c = r = 0, z = 0, s(0) = 1/2. sigmoid: (1 - eps) ln 2 + eps ln 2 = ln 2 = 0.69314718 for every eps; robust:
    ((1 - eps) ln 2 - eps ln 2) / (1 - 2 eps) = ln 2; aot / aot_unpaired: sorted gaps are 0, so ln 2.
    NOT ln 2: nca_pair ln 2 + 0.5 ln 2 + 0.5 ln 2 = 2 ln 2 = 1.38629436; bco_pair ln 2 + ln 2 = 1.38629436;
    apo_zero (1 - 1/2) + 1/2 = 1; apo_down 1/2 + (1 - 1/2) = 1."""
    t = terms([-1.0, -4.0], [-2.0, -3.0], [-1.0, -4.0], [-2.0, -3.0], [0.0, 0.0], [0.0, 0.0], [3.0, 5.0], [2.0, 7.0])
    assert close(dpo_loss(loss_type, t, beta=0.7, label_smoothing=eps), [expected, expected])


@pytest.mark.parametrize("z, expected", [(0.0, -0.25), (1.0, -0.13447071)])
def test_sigmoid_gradient(z, expected):
    """d L(beta (c - r)) / d policy_chosen = -beta s(-z); d / d policy_rejected = +beta s(-z). beta = 0.5:
    z = 0: -0.5 * 1/2 = -0.25; z = 1: -0.5 s(-1) = -0.5 * 0.26894142 = -0.13447071."""
    pc = torch.tensor([-2.0 + 2 * z], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    rc, rr = T([-2.0]), T([-3.0])
    t = PairTerms(pc, pr, rc, rr, pc - rc, pr - rr, T([1.0]), T([1.0]), T([0.0]))
    dpo_loss("sigmoid", t, beta=0.5).sum().backward()
    assert close(pc.grad, [expected]) and close(pr.grad, [-expected])


def test_every_dpo_loss_type_is_covered_and_unknown_raises():
    """Each of DPO_LOSS_TYPES is called by name in a hand-worked test of this file (read from its source, so the
    check does not depend on test order); unknown types raise."""
    source = Path(__file__).read_text()
    assert [k for k in DPO_LOSS_TYPES if f'dpo_loss("{k}"' not in source] == []
    with pytest.raises(ValueError):
        dpo_loss("nope", terms(**ONE), beta=0.5)
    with pytest.raises(ValueError):
        cpo_loss("nope", T([0.0]), T([0.0]), beta=0.5)


# Log-ratios +-ln 4, i.e. t = 4 and t = 1/4.
@pytest.mark.parametrize("kind, alpha, expected", [
    ("reverse_kl", 0.5, [math.log(4), -math.log(4)]),  # the log-ratio itself: [1.38629436, -1.38629436]
    ("forward_kl", 0.5, [0.75, -3.0]),  # 1 - 1/t: 1 - 1/4, 1 - 4
    ("js_divergence", 0.5, [0.47000363, -0.91629073]),  # log(2t/(t+1)): log(8/5), log(0.5/1.25) = log 0.4
    ("alpha_divergence", 0.5, [1.0, -2.0]),  # (t^-0.5 - 1)/(-0.5): (1/2 - 1)/(-1/2) = 1, (2 - 1)/(-1/2) = -2
    ("alpha_divergence", 2.0, [3.0, -0.75]),  # (t - 1)/1: 4 - 1, 1/4 - 1
    ("alpha_divergence", 1.0, [math.log(4), -math.log(4)]),  # alpha = 1: the limit log t, the log-ratio
    ("alpha_divergence", 1.0 + 1e-7, [math.log(4), -math.log(4)]),  # |alpha - 1| < 1e-6 falls back too
])
def test_f_divergence_scores(kind, alpha, expected):
    """f'(t) of t = exp(log-ratio) for t = 4 and 1/4; the arithmetic is beside each case."""
    assert close(f_divergence_scores(T([math.log(4), -math.log(4)]), kind, alpha), expected)


def test_alpha_divergence_clamps_the_exponent():
    """alpha = 2, log-ratio 100: (alpha - 1) * 100 = 100 is clamped to 80: (e^80 - 1)/1 = 5.5406224e34."""
    out = f_divergence_scores(T([100.0]), "alpha_divergence", 2.0)
    assert torch.allclose(out, T([5.5406224e34]), rtol=1e-7, atol=0.0)


def test_wpo_weights():
    """exp(chosen_wpo / n_c) * exp(rejected_wpo / n_r), token counts clamped to >= 1.
    Pair 1: exp(-2/4) exp(-3/3) = e^-1.5 = 0.22313016. Pair 2: exp(0/max(0,1)) exp(-1/2) = e^-0.5 = 0.60653066."""
    chosen = T([-2.0, 0.0]).requires_grad_()
    w = wpo_weights(chosen, T([-3.0, -1.0]), T([4.0, 0.0]), T([3.0, 2.0]))
    assert close(w, [0.22313016, 0.60653066])
    assert not w.requires_grad  # a weight, not a gradient path


# chosen = [-1, -2], rejected = [-3, -1]: logits = [2, -1]; beta = 0.5.
@pytest.mark.parametrize("loss_type, eps, expected", [
    ("sigmoid", 0.0, [0.31326169, 0.97407698]),  # z = [1, -0.5]: L(1), L(-0.5) = 0.5 + L(0.5) = 0.5 + 0.47407698
    ("sigmoid", 0.25, [0.56326169, 0.84907698]),  # L(z) + 0.25 z: L(1) + 0.25, L(-0.5) - 0.125
    ("hinge", 0.0, [0.0, 1.5]),  # relu(1 - 0.5 * [2, -1]) = [relu(0), relu(1.5)]
    ("ipo", 0.0, [1.0, 4.0]),  # (logits - 1/(2 * 0.5))^2 = [(2 - 1)^2, (-1 - 1)^2]
    ("simpo", 0.0, [0.47407698, 1.31326169]),  # gamma = 0.5: z = 0.5 (logits - 0.5/0.5) = [0.5, -1]: L(0.5), L(-1)
])
def test_cpo_loss(loss_type, eps, expected):
    """CPO on the policy's own log-probs; the arithmetic is beside each case (L(-z) = z + L(z))."""
    out = cpo_loss(loss_type, T([-1.0, -2.0]), T([-3.0, -1.0]), beta=0.5, label_smoothing=eps, gamma=0.5)
    assert close(out, expected)


def test_log1mexp_both_branches():
    """log(1 - e^x). x = -ln 4 < -ln 2 (log1p branch): ln(3/4) = -0.28768207. x = -ln(4/3) > -ln 2 (expm1
    branch): ln(1/4) = -1.38629436. x = -1e-3: ln(1 - e^-0.001) = ln(9.9950017e-4) = -6.90825524.
    x = -1e-10: ln(1e-10 - 5e-21) = -23.02585093 (log(1 - exp(x)) computed naively would be ln 0 = -inf)."""
    x = T([-math.log(4), -math.log(4 / 3), -1e-3, -1e-10])
    assert close(log1mexp(x), [-0.28768207, -1.38629436, -6.90825524, -23.02585093])


def test_orpo_log_odds():
    """Per-token mean log-probs log p: odds(p) = p / (1 - p).
    Pair 1: p_c = 3/4, p_r = 1/4: ln 3 - ln(1/3) = 2 ln 3 = 2.19722458.
    Pair 2: p_c = 1/5, p_r = 1/2: ln(1/4) - ln 1 = -1.38629436."""
    out = orpo_log_odds(T([math.log(0.75), math.log(0.2)]), T([math.log(0.25), math.log(0.5)]))
    assert close(out, [2.19722458, -1.38629436])


def test_kl_penalties_by_hand():
    """Per token, d = logp - ref. With logp = ln 0.5, ref = ln 0.25, d = ln 2 = 0.693147:
    k1 = 0.693147; k2 = d^2/2 = 0.240227; k3 = e^-d - 1 + d = 0.5 - 1 + 0.693147 = 0.193147; abs = 0.693147;
    low_var_kl = k3 here (no clamp bites). With d = -30 (logp far below ref): k3 = e^30 - 31 = 1.0686e13, while
    low_var_kl clamps -d to 20 and then e^20 - 21 = 4.85e8 to 10. corrected_k3 is k3 (no generating policy)."""
    from trinity_dpo.objective.losses import kl_penalty

    logp, ref = torch.tensor([math.log(0.5), -30.0]), torch.tensor([math.log(0.25), 0.0])
    d = math.log(2)
    expected = {"k1": [d, -30.0], "k2": [d * d / 2, 450.0], "k3": [0.5 - 1 + d, math.exp(30) - 31],
                "abs": [d, 30.0], "low_var_kl": [0.5 - 1 + d, 10.0], "corrected_k3": [0.5 - 1 + d, math.exp(30) - 31]}
    for name, want in expected.items():
        got = kl_penalty(name, logp.double(), ref.double())
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12), name
    with pytest.raises(ValueError):
        kl_penalty("k4", logp, ref)
