"""The one rate-basis rule (xqsim.rates): a GPU's fit applies to the engine it describes, fused configurations
run on the kernel engine, a missing fit falls back to spec rates with the reason in the basis, and `transferred`
lends another GPU's fit by efficiencies."""

import pytest

from xqsim import loading, rates, specs

H100, H200 = loading.load_hardware("h100_sxm"), loading.load_hardware("h200")
UNFUSED, FUSED = specs.SchemeConfig(scheme="kivi", bits=2), specs.SchemeConfig(scheme="kivi", bits=2, fused=True)


def test_fit_applies_to_its_engine_only():
    assert H100.fitted is not None and H100.fitted.engine == "torch"  # the shipped fit is of the torch engine
    r, b = rates.rates(H100, UNFUSED, "fitted")
    assert b.label == "fitted (h100_sxm, torch engine)"
    assert r == H100.rates(fitted=True)
    r, b = rates.rates(H100, FUSED, "fitted")
    assert b.label == "spec (no triton-engine fit)", b.label
    assert r == H100.rates(fitted=False)


def test_spec_mode_ignores_every_fit():
    for cfg in (UNFUSED, FUSED):
        r, b = rates.rates(H100, cfg, "spec")
        assert (b.label, r) == ("spec", H100.rates(fitted=False))


def test_transferred_lends_efficiencies_not_figures():
    r, b = rates.rates(H200, UNFUSED, "transferred", donors=(H100,))
    assert b.label == "transferred (h100_sxm, torch engine)"
    eff = H100.fitted.mem_efficiency["dequant"]
    assert r.bytes_per_s["dequant"] == pytest.approx(H200.mem_bytes_per_s.value * eff, rel=1e-12)
    assert r.bytes_per_s["dequant"] != H100.rates(fitted=True).bytes_per_s["dequant"]  # H200's bandwidth, not H100's
    # a GPU's own fit wins over a lent one; a fused configuration finds no kernel-engine fit to lend
    assert rates.choose(H100, UNFUSED, "transferred", donors=(H100,))[1].kind == "fitted"
    assert rates.choose(H200, FUSED, "transferred", donors=(H100,))[1].label == "spec (no triton-engine fit)"
    # in `fitted` mode nothing is lent
    assert rates.choose(H200, UNFUSED, "fitted", donors=(H100,))[1].label == "spec (no torch-engine fit)"


def test_kernel_engine_fit_serves_fused_configurations():
    kernel = H200.model_copy(update={"fitted": H100.fitted.model_copy(update={"engine": "triton"})})
    assert rates.choose(kernel, FUSED, "fitted")[1].label == "fitted (h200, triton engine)"
    assert rates.choose(kernel, UNFUSED, "fitted")[1].label == "spec (no torch-engine fit)"


def test_summary_names_each_basis_and_where_it_applies():
    line = rates.summary([H100, H200], [specs.SchemeConfig(scheme="fp16"), UNFUSED, FUSED], "fitted")
    assert line == ("rates fitted: fitted (h100_sxm, torch engine) on h100_sxm (unfused configurations) | "
                    "spec (no triton-engine fit) on h100_sxm, h200 (fused configurations) | "
                    "spec (no torch-engine fit) on h200 (unfused configurations)"), line


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="allowed: spec, fitted, transferred"):
        rates.check("fit")


def test_a_scheme_the_fit_never_saw_takes_spec_rates_and_says_so():
    fit = H100.fitted.model_copy(update={"schemes": ["fp16", "kivi"]})
    hw = H100.model_copy(update={"fitted": fit})
    assert rates.choose(hw, UNFUSED, "fitted")[1].kind == "fitted"
    xq = specs.SchemeConfig(scheme="xquant", bits=2)
    r, b = rates.rates(hw, xq, "fitted")
    assert b.label == "spec (the torch-engine fit saw no xquant)" and r == H100.rates(fitted=False), b.label
    # transferred: a lender must have seen the scheme too
    assert rates.choose(H200, xq, "transferred", donors=(hw,))[1].label == "spec (no torch-engine fit)"
