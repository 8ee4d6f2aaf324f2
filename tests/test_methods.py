"""Every editing method on the real default model: it changes a CounterFact fact, reverts bit
for bit, works again on an already-edited model, and rejects bad names and hyperparameters."""
from __future__ import annotations

import pytest
import torch

from memit import WeightDeltas, edit_model, get_editor_class
from memit.editing.hparams import HyperParamsError, list_presets
from memit.predict import score_continuations

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

METHODS = ["ROME", "FT", "FT-L", "AlphaEdit"]
# MEND edits only with a trained network: tests/test_mend.py trains one.
ALL_METHODS = ["MEMIT", *METHODS, "MEND"]
# Cheap settings: fewer optimisation steps, and the test statistics of layers 4-8 that
# the MEMIT tests cache (same sample count and token limit as ``default_hparams``).
FAST = {"ROME": {"v_num_grad_steps": 12}, "FT": {}, "FT-L": {}, "AlphaEdit": {"v_num_grad_steps": 12}}


@pytest.fixture(scope="module")
def make_hparams(default_hparams):
    def make(alg: str):
        hparams = get_editor_class(alg).hparams_class.preset("SmolLM2-135M-Instruct")
        for name, value in FAST[alg].items():
            setattr(hparams, name, value)
        if hasattr(hparams, "mom2_n_samples"):
            hparams.mom2_n_samples = default_hparams.mom2_n_samples
            hparams.mom2_max_tokens = default_hparams.mom2_max_tokens
        return hparams

    return make


def _margin(model, tok, record) -> float:
    """NLL(target_true) − NLL(target_new) on the rewrite prompt: positive once the edit took."""
    rewrite = record["requested_rewrite"]
    prompt = rewrite["prompt"].format(rewrite["subject"])
    new, true = score_continuations(
        model, tok, [prompt, prompt], [" " + rewrite["target_new"]["str"], " " + rewrite["target_true"]["str"]]
    )
    return true.mean_nll - new.mean_nll


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same(model, snapshot) -> None:
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, snapshot[name])]
    assert not changed, f"weights differ after revert: {changed[:3]}"


@pytest.mark.parametrize("alg", METHODS)
def test_method_rewrites_a_fact_and_reverts_exactly(alg, default_model, counterfact_records, make_hparams):
    model, tok = default_model
    record = counterfact_records[0]
    before = _snapshot(model)
    assert _margin(model, tok, record) < 0
    deltas = edit_model(model, tok, [record], make_hparams(alg), algorithm=alg)
    try:
        assert deltas.manifest["algorithm"] == alg
        assert _margin(model, tok, record) > 0
        if alg == "FT-L":
            bound = make_hparams(alg).norm_constraint
            assert all(float(d.abs().max()) <= bound * (1 + 1e-5) for d in deltas.deltas.values())
    finally:
        deltas.revert(model)
    _assert_same(model, before)


@pytest.mark.parametrize("alg", ["ROME", "AlphaEdit"])
def test_method_edits_an_already_edited_model(alg, default_model, counterfact_records, make_hparams, tmp_path):
    """Sequential editing: a second batch on top of the first (saved and loaded again, as a
    resumed run or ``memit edit --on-top-of`` does) keeps both facts."""
    model, tok = default_model
    first, second = counterfact_records[1], counterfact_records[2]
    before = _snapshot(model)
    hparams = make_hparams(alg)
    edits = [edit_model(model, tok, [first], hparams, algorithm=alg)]
    try:
        edits[0].save(tmp_path / "first")
        edits[0].revert(model)
        edits[0] = WeightDeltas.load(tmp_path / "first").apply(model)
        if alg == "AlphaEdit":  # the edited keys, one row per request, travel with the edit
            width = model.get_parameter(f"model.layers.{hparams.layers[0]}.mlp.down_proj.weight").shape[1]
            assert {name: tuple(k.shape) for name, k in edits[0].state.items()} == {
                f"keys.layer{layer}": (1, width) for layer in hparams.layers
            }
        edits.append(edit_model(model, tok, [second], hparams, algorithm=alg, earlier=edits))
        assert _margin(model, tok, first) > 0 and _margin(model, tok, second) > 0
    finally:
        for deltas in reversed(edits):
            deltas.revert(model)
    _assert_same(model, before)


def test_alphaedit_refuses_to_preserve_an_edit_without_keys(default_model, counterfact_records, make_hparams):
    model, tok = default_model
    before = _snapshot(model)
    memit_edit = WeightDeltas({}, {"algorithm": "MEMIT"})
    with pytest.raises(ValueError, match=r"earlier\[0\]: this MEMIT edit kept no keys for layer 4"):
        edit_model(model, tok, [counterfact_records[1]], make_hparams("AlphaEdit"), algorithm="AlphaEdit", earlier=[memit_edit])
    _assert_same(model, before)


def test_rome_applies_requests_one_after_another(default_model, counterfact_records, make_hparams):
    """Two requests in one call: both facts change, through one delta per weight."""
    model, tok = default_model
    records = counterfact_records[3:5]
    before = _snapshot(model)
    hparams = make_hparams("ROME")
    deltas = edit_model(model, tok, records, hparams, algorithm="ROME")
    try:
        assert list(deltas.deltas) == [f"model.layers.{hparams.layers[0]}.mlp.down_proj.weight"]
        assert all(_margin(model, tok, r) > 0 for r in records)
    finally:
        deltas.revert(model)
    _assert_same(model, before)


def test_alphaedit_update_stays_in_the_null_space():
    """ΔW P = ΔW: the update leaves keys in the preserved (principal) subspace alone."""
    from memit.editing.alphaedit.main import null_space_projector, solve_projected_update

    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    moment = basis @ torch.diag(torch.cat([torch.full((6,), 1e-4), torch.linspace(1, 5, 10)]).double()) @ basis.T
    projector = null_space_projector(moment, 1e-2)
    assert round(float(projector.trace())) == 6
    keys, residual = torch.randn(3, 16), torch.randn(3, 8)
    update = solve_projected_update(keys, residual, projector, None, 1.0)
    assert torch.allclose(update @ projector, update, atol=1e-10)
    preserved = basis[:, 6:]
    assert (update @ preserved).abs().max() < 1e-10
    # Keys of earlier edits (in the null space too) get a much smaller change than without them.
    earlier_keys = 10 * torch.randn(4, 6).double() @ basis[:, :6].T
    protected = solve_projected_update(keys, residual, projector, earlier_keys.T @ earlier_keys, 1.0)
    assert (protected @ earlier_keys.T).norm() < 0.1 * (update @ earlier_keys.T).norm()


def test_presets_exist_for_every_method():
    for alg in ALL_METHODS:
        assert {"SmolLM2-135M-Instruct", "gpt2-xl", "EleutherAI_gpt-j-6B"} <= set(list_presets(alg)), alg
    rome = get_editor_class("ROME").hparams_class.preset("gpt2-xl")
    assert rome.layers == [17] and rome.clamp_norm_factor == 4 and rome.mom2_adjustment
    ftl = get_editor_class("FT-L").hparams_class.preset("gpt2-xl")
    assert ftl.norm_constraint == 5e-4 and ftl.lr == 5e-4 and ftl.num_steps == 25
    ftw = get_editor_class("FT").hparams_class.preset("EleutherAI_gpt-j-6B")
    assert ftw.layers == [21] and ftw.norm_constraint is None and ftw.wd_power_law is not None
    # Every preset file of every method loads and passes its method's validation.
    for alg in ALL_METHODS:
        for name in list_presets(alg):
            get_editor_class(alg).hparams_class.preset(name).validate()
    qwen = get_editor_class("MEMIT").hparams_class.preset("qwen2.5-coder-0.5b-instruct-sequential")
    assert qwen.layers == [2, 3, 4, 5, 6] and qwen.preserve_weight == 1.0 and qwen.targets_from_unedited


def test_unknown_method_name_is_rejected(default_model, counterfact_records):
    model, tok = default_model
    with pytest.raises(ValueError, match=r"unknown editing method 'SERAC'.*'AlphaEdit', 'FT', 'FT-L', 'MEMIT', 'MEND', 'ROME'"):
        edit_model(model, tok, [counterfact_records[0]], {}, algorithm="SERAC")


@pytest.mark.parametrize("alg", ALL_METHODS)
def test_unknown_or_mistyped_hyperparameters_are_named(alg):
    cls = get_editor_class(alg).hparams_class
    data = cls.preset("SmolLM2-135M-Instruct").to_dict()
    with pytest.raises(HyperParamsError, match=rf"unknown {alg} hyperparameter\(s\) \['learning_rate'\]"):
        cls.from_dict({**data, "learning_rate": 1})
    with pytest.raises(HyperParamsError, match="hyperparameter 'layers' must be list"):
        cls.from_dict({**data, "layers": 6})


def test_method_specific_values_are_checked():
    ft = get_editor_class("FT").hparams_class
    ftl = get_editor_class("FT-L").hparams_class
    data = ft.preset("SmolLM2-135M-Instruct").to_dict()
    with pytest.raises(HyperParamsError, match="'norm_constraint' must be float"):
        ft.from_dict({**data, "norm_constraint": "tight"})
    with pytest.raises(HyperParamsError, match="'norm_constraint' is required for FT-L"):
        ftl.from_dict({**data, "norm_constraint": None})
    alpha = get_editor_class("AlphaEdit").hparams_class
    with pytest.raises(HyperParamsError, match="'nullspace_threshold' must be positive"):
        alpha.from_dict({**alpha.preset("SmolLM2-135M-Instruct").to_dict(), "nullspace_threshold": 0})


def test_editor_refuses_another_methods_hyperparameters(default_model):
    from memit import MEMITHyperParams

    with pytest.raises(HyperParamsError, match="ROME needs ROMEHyperParams, got MEMITHyperParams"):
        get_editor_class("ROME")(MEMITHyperParams.preset("SmolLM2-135M-Instruct"))
