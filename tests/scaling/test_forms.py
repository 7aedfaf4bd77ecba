"""Law forms: the paper preset against the formula computed by hand, reductions, gradients, vectorisation."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from sparse_dc.errors import SparseDCError
from sparse_dc.scaling.dual import Dual
from sparse_dc.scaling.forms import CHINCHILLA, MUENNIGHOFF, PAPER, find_preset, get_form


def by_hand(N, U, D, S, p=PAPER):
    """scaling-law.md (the official notebook's `scaling_law`) written out literally in scalar math, independent of
    the vectorised implementation."""
    A, B, E, alpha = math.exp(p["a"]), math.exp(p["b"]), math.exp(p["e"]), p["alpha"]
    beta = alpha
    f = S ** p["eps"] + p["c"] * (1 - S) ** p["mu"]
    G = (alpha * A * f / (beta * B)) ** (1 / (alpha + beta))
    n_opt = lambda C: G * (C / 6) ** (beta / (alpha + beta))  # noqa: E731
    c_of_d = lambda d: 6 * (G * d) ** ((alpha + beta) / alpha)  # noqa: E731
    u_n = min(N, n_opt(c_of_d(U)))
    r_n, r_d = max(N / u_n - 1, 0), max(D / U - 1, 0)
    rn_star = p["g1"] * (1 + (1 - S) * p["c11"] - p["c21"] * (1 - S) ** 2)
    rd_star = p["g2"] * (1 + (1 - S) * p["c12"] - p["c22"] * (1 - S) ** 2)
    n_eff = u_n + u_n * rn_star * (1 - math.exp(-r_n / rn_star))
    d_eff = U + U * rd_star * (1 - math.exp(-r_d / rd_star))
    return E + A * f / n_eff ** alpha + B / d_eff ** beta


def point(N, U, D, S):
    return SimpleNamespace(active_params=np.array([N]), unique_tokens=np.array([U]), tokens=np.array([D]),
                           density=np.array([S]))


@pytest.mark.parametrize("N,U,D,S", [(1e8, 1e9, 4e9, 0.5), (9.6e8, 2.6e9, 2.08e10, 0.5), (3e9, 1e8, 1.6e9, 0.0625),
                                     (5e7, 2e9, 2e9, 1.0), (2e9, 1e8, 3.2e9, 0.25),
                                     (1.3e9, 1.3e8, 2e7, 1.0), (2e8, 1e9, 1e8, 0.125)])  # D < U: R_D = 0, D_eff = U
def test_paper_preset_matches_formula_by_hand(N, U, D, S):
    assert get_form("paper").predict(PAPER, point(N, U, D, S))[0] == pytest.approx(by_hand(N, U, D, S), rel=1e-12)


def test_law_is_the_notebooks_to_the_last_bits():
    """2000 random (N, U, D, S), D from 0.05 to 40 epochs (below one epoch too): the logsumexp form equals the
    literal formula (the notebook's `scaling_law`) to a few units in the last place."""
    rng = np.random.default_rng(0)
    n = 2000
    N, U = np.exp(rng.uniform(np.log(1e7), np.log(1e10), n)), np.exp(rng.uniform(np.log(1e8), np.log(3e10), n))
    D, S = U * np.exp(rng.uniform(np.log(0.05), np.log(40), n)), rng.choice([1.0, 0.5, 0.25, 0.125, 0.0625], n)
    ours = get_form("paper").predict(PAPER, SimpleNamespace(active_params=N, unique_tokens=U, tokens=D, density=S))
    np.testing.assert_allclose(ours, np.vectorize(by_hand)(N, U, D, S), rtol=2e-15, atol=0)


def test_sanity_values_from_the_reference():
    law = get_form("paper")
    assert law.predict(PAPER, point(1e8, 1e9, 4e9, 0.5))[0] == pytest.approx(3.085263, abs=1e-6)
    assert law.predict(PAPER, point(9.6e8, 2.6e9, 2.08e10, 0.5))[0] == pytest.approx(2.764905, abs=1e-6)


def test_dense_single_epoch_reduces_to_chinchilla_form():
    # N below U_N's cap G(1)^2 U = 7.2e7 (so R_N = 0): nothing is repeated, the law is E + A f(1)/N^a + B/U^b
    N, U, alpha = 5e7, 1e9, PAPER["alpha"]
    A, B, E = (math.exp(PAPER[k]) for k in ("a", "b", "e"))
    expected = E + A * 1.0 / N ** alpha + B / U ** alpha  # f(1) = 1
    assert get_form("paper").predict(PAPER, point(N, U, U, 1.0))[0] == pytest.approx(expected, rel=1e-12)


def test_a_dense_run_has_f_one_whatever_mu():
    """c (1-S)^mu is exactly 0 at S = 1 (the official code's 0^mu would be inf for mu < 0)."""
    law, x = get_form("paper"), point(5e7, 1e9, 1e9, 1.0)
    assert law.predict({**PAPER, "mu": -0.5}, x)[0] == law.predict({**PAPER, "c": 0.0}, x)[0] == law.predict(PAPER, x)[0]


def test_repetition_raises_loss_less_when_sparse():
    """Delayed saturation: going from 1 to 16 epochs at fixed D hurts a sparse model less than a dense one."""
    law = get_form("paper")
    gap = {s: law.predict(PAPER, point(2e8 * s, 2e9 / 16, 2e9, s))[0] - law.predict(PAPER, point(2e8 * s, 2e9, 2e9, s))[0]
           for s in (1.0, 0.5)}
    assert 0 < gap[0.5] < gap[1.0]


def test_muennighoff_ignores_density_and_chinchilla_ignores_repetition():
    m = get_form("muennighoff")
    assert m.predict(MUENNIGHOFF, point(1e8, 1e9, 4e9, 0.25)) == pytest.approx(m.predict(MUENNIGHOFF, point(1e8, 1e9, 4e9, 1.0)))
    c = get_form("chinchilla")
    A, B, E = (math.exp(CHINCHILLA[k]) for k in ("a", "b", "e"))
    assert c.predict(CHINCHILLA, point(1e8, 1e9, 4e9, 0.5))[0] == pytest.approx(
        E + A / 1e8 ** 0.34 + B / 4e9 ** 0.28, rel=1e-12)
    # Muennighoff: repeated data is worth less than unique data of the same total
    assert m.predict(MUENNIGHOFF, point(1e8, 1e9, 8e9, 1.0))[0] > m.predict(MUENNIGHOFF, point(1e8, 8e9, 8e9, 1.0))[0]


def test_forms_vectorise_over_grids_of_parameters():
    law = get_form("paper")
    x = point(1e8, 1e9, 4e9, 0.5)
    x = SimpleNamespace(**{k: np.repeat(v, 5) for k, v in vars(x).items()})
    grid = {**PAPER, "alpha": np.array([[0.3], [0.33], [0.36]])}  # (3, 1) against 5 runs
    out = law.predict(grid, x)
    assert out.shape == (3, 5)
    assert out[1, 0] == pytest.approx(law.predict({**PAPER, "alpha": 0.33}, x)[0])


@pytest.mark.parametrize("form", ["paper", "muennighoff", "chinchilla"])
def test_forward_mode_jacobian_matches_finite_differences(form):
    law = get_form(form)
    p = dict(law.presets[form])
    rng = np.random.default_rng(0)
    x = SimpleNamespace(active_params=np.exp(rng.uniform(17, 22, 40)), unique_tokens=np.exp(rng.uniform(18, 22, 40)),
                        tokens=None, density=rng.choice([1.0, 0.5, 0.125], 40))
    x.tokens = x.unique_tokens * rng.choice([1.0, 3.0, 16.0], 40)
    names = list(p)
    theta = np.array([p[k] for k in names])
    jac = law.log_predict(dict(zip(names, Dual.seed(theta))), x).jacobian()
    for k in range(len(names)):
        h = 1e-6 * max(1.0, abs(theta[k]))
        up, dn = theta.copy(), theta.copy()
        up[k] += h
        dn[k] -= h
        fd = (law.log_predict(dict(zip(names, up)), x) - law.log_predict(dict(zip(names, dn)), x)) / (2 * h)
        np.testing.assert_allclose(jac[k], fd, atol=1e-7, err_msg=names[k])


def test_unknown_form_and_preset_are_one_line_errors():
    with pytest.raises(SparseDCError, match="law form 'nope' is unknown; expected one of paper, muennighoff, "
                                            "chinchilla"):
        get_form("nope")
    with pytest.raises(SparseDCError, match="preset 'nope' is unknown; expected one of paper, muennighoff, chinchilla"):
        find_preset("nope")
    with pytest.raises(SparseDCError, match="preset 'muennighoff' is not defined for the paper law; expected one of "
                                            "paper$"):
        get_form("paper").preset("muennighoff")
    with pytest.raises(SparseDCError, match="chinchilla law parameters are missing b, e, alpha, beta; expected all "
                                            "of a, b, e, alpha, beta$"):
        get_form("chinchilla").check_params({"a": 1.0})
    assert get_form("chinchilla").check_params({**CHINCHILLA, "extra": 3, "a": 2}) == {**CHINCHILLA, "a": 2.0}


def test_a_registered_form_is_found_by_name():
    from dataclasses import replace

    from sparse_dc.scaling.forms import register_form

    from sparse_dc.scaling import forms

    fixed = replace(get_form("paper"), name="paper-fixed-c", fixed={"c": 0.0})
    try:
        assert register_form(fixed) is fixed and get_form("paper-fixed-c") is fixed
    finally:
        forms._FORMS.pop("paper-fixed-c", None)
    x = point(1e8, 1e9, 4e9, 0.5)
    without_c = {k: v for k, v in PAPER.items() if k != "c"}  # a fixed coefficient fills in what is not given
    assert fixed.predict(without_c, x)[0] == get_form("paper").predict({**PAPER, "c": 0.0}, x)[0]


def test_stage_selectors_at_their_boundaries():
    """One epoch is D <= U up to rounding (D = U exactly counts, 1.5 epochs do not); dense is S = 1."""
    from sparse_dc.scaling.forms import dense, single_epoch

    x = SimpleNamespace(tokens=np.array([1e9, 1e9 * (1 + 1e-7), 1.5e9, 0.5e9, 2.5e9]),
                        unique_tokens=np.full(5, 1e9), density=np.array([1.0, 1.0 - 1e-13, 0.99, 0.5, 1]))
    assert single_epoch(x).tolist() == [True, True, False, True, False]
    assert dense(x).tolist() == [True, True, False, False, True]
    # the tolerances are inclusive: D = U (1 + 1e-6) is still one epoch, S = 1 - 1e-12 still dense
    edge = SimpleNamespace(tokens=np.array([1e9 * (1 + 1e-6), 1e9 * (1 + 2e-6)]), unique_tokens=np.full(2, 1e9),
                           density=np.array([1.0 - 1e-12, 1.0 - 2e-12]))
    assert single_epoch(edge).tolist() == [True, False]
    assert dense(edge).tolist() == [True, False]


def test_integer_counts_as_the_ledger_stores_them():
    """Counts arrive as Python ints (JSON); beyond int64 (1e20 tokens) numpy would keep them as objects."""
    big = SimpleNamespace(active_params=[10 ** 8], unique_tokens=[10 ** 19], tokens=[4 * 10 ** 20], density=[1])
    as_float = SimpleNamespace(active_params=[1e8], unique_tokens=[1e19], tokens=[4e20], density=[1.0])
    for form, preset in (("paper", PAPER), ("chinchilla", CHINCHILLA)):
        assert get_form(form).predict(preset, big)[0] == get_form(form).predict(preset, as_float)[0]


def test_counts_beyond_int64_in_every_field():
    """Every count may be a Python int too large for int64 (numpy keeps those as objects, which np.log rejects):
    the law converts each one to float first."""
    big = SimpleNamespace(active_params=[10 ** 20], unique_tokens=[10 ** 20], tokens=[4 * 10 ** 20], density=[1])
    as_float = SimpleNamespace(active_params=[1e20], unique_tokens=[1e20], tokens=[4e20], density=[1.0])
    for form, preset in (("paper", PAPER), ("muennighoff", MUENNIGHOFF), ("chinchilla", CHINCHILLA)):
        expected = get_form(form).predict(preset, as_float)[0]
        assert np.isfinite(expected) and get_form(form).predict(preset, big)[0] == expected


def test_float32_inputs_are_computed_in_float64():
    """Columns may arrive as float32 (a dataframe, a tensor): the law and the half-lives are computed in float64,
    bit for bit what the same numbers give as float64, not in float32's 7 digits."""
    rng = np.random.default_rng(3)
    N, U = rng.uniform(1e7, 1e9, 8).astype(np.float32), rng.uniform(1e8, 1e10, 8).astype(np.float32)
    D, S = U * np.float32(3.7), rng.choice([1.0, 0.5, 0.3, 0.0625], 8).astype(np.float32)
    single = SimpleNamespace(active_params=N, unique_tokens=U, tokens=D, density=S)
    double = SimpleNamespace(**{k: v.astype(np.float64) for k, v in vars(single).items()})
    for form, preset in (("paper", PAPER), ("muennighoff", MUENNIGHOFF), ("chinchilla", CHINCHILLA)):
        got = get_form(form).predict(preset, single)
        assert got.dtype == np.float64 and got.tolist() == get_form(form).predict(preset, double).tolist()
    got_n, got_d = get_form("paper").repetition_half_lives(PAPER, S)
    want_n, want_d = get_form("paper").repetition_half_lives(PAPER, S.astype(np.float64))
    assert got_n.dtype == got_d.dtype == np.float64
    assert (got_n.tolist(), got_d.tolist()) == (want_n.tolist(), want_d.tolist())


def test_preset_errors_list_the_forms_presets():
    """A form with several presets lists them all; one with none says so."""
    from dataclasses import replace

    two = replace(get_form("paper"), name="paper-two", presets={"paper": PAPER, "refit": PAPER})
    with pytest.raises(SparseDCError, match=r"preset 'x' is not defined for the paper-two law; expected one of "
                                            r"paper, refit$"):
        two.preset("x")
    none = replace(get_form("paper"), name="paper-none", presets={})
    with pytest.raises(SparseDCError, match=r"preset 'paper' is not defined for the paper-none law; expected one "
                                            r"of \(none\)$"):
        none.preset("paper")


def test_the_paper_form_takes_a_separate_beta():
    """beta defaults to alpha (the paper's tie); a given beta is used in the data term."""
    x = point(1e8, 1e9, 4e9, 0.5)
    law = get_form("paper")
    assert law.predict({**PAPER, "beta": PAPER["alpha"]}, x)[0] == law.predict(PAPER, x)[0]
    A, B, E = (math.exp(PAPER[k]) for k in ("a", "b", "e"))
    tied, untied = law.predict(PAPER, x)[0], law.predict({**PAPER, "beta": 0.5}, x)[0]
    assert untied != tied and E < untied < E + A + B


def test_paper_preset_is_the_published_coefficients():
    """The numbers of scaling-law.md's "Published coefficients", typed here, not read from the code under test."""
    published = {"a": 5.24073718, "b": 6.10303089, "e": 0.85355013, "alpha": 0.32682177, "eps": -0.00968044,
                 "mu": 0.84661793, "c": -0.27288932, "g1": 11.08763712, "g2": 4.40474882, "c11": 1.90420893,
                 "c12": 1.82159486, "c21": 2.79936732, "c22": 1.36557887}
    assert get_form("paper").preset("paper") == published == PAPER
    assert find_preset("paper")[1] == published


@pytest.mark.parametrize("S", [1.0, 0.5, 0.25, 0.0625])
def test_repetition_half_lives_are_the_published_quadratics(S):
    """R_N*(S), R_D*(S) (they go into the reproduce report) against the formula with the published numbers typed
    out: a sign or coefficient slip in either quadratic changes them."""
    s = 1 - S
    rn = 11.08763712 * (1 + 1.90420893 * s - 2.79936732 * s * s)
    rd = 4.40474882 * (1 + 1.82159486 * s - 1.36557887 * s * s)
    got_n, got_d = get_form("paper").repetition_half_lives(PAPER, np.array([S]))
    assert (got_n[0], got_d[0]) == (pytest.approx(rn, rel=1e-14), pytest.approx(rd, rel=1e-14))
    # a reduced form's fixed coefficients count: Muennighoff's half-lives do not depend on density
    mn, md = get_form("muennighoff").repetition_half_lives(MUENNIGHOFF, np.array([S]))
    assert (mn[0], md[0]) == (pytest.approx(MUENNIGHOFF["g1"]), pytest.approx(MUENNIGHOFF["g2"]))
