import json
import logging

import pytest

from memit import MEMITHyperParams, get_editor_class
from memit.editing.hparams import HyperParamsError, list_presets


def test_paper_presets_load_verbatim():
    gptj = MEMITHyperParams.preset("EleutherAI_gpt-j-6B")
    assert gptj.layers == [3, 4, 5, 6, 7, 8] and gptj.mom2_update_weight == 15000
    assert gptj.rewrite_module_tmp == "transformer.h.{}.mlp.fc_out"
    assert MEMITHyperParams.preset("gpt2-xl").layers == [13, 14, 15, 16, 17]
    assert "SmolLM2-135M-Instruct" in list_presets("MEMIT")


def test_unknown_and_mistyped_hyperparameters_are_named(tmp_path):
    data = MEMITHyperParams.preset("SmolLM2-135M-Instruct").to_dict()
    path = tmp_path / "h.json"
    path.write_text(json.dumps({**data, "learning_rate": 1}))
    with pytest.raises(HyperParamsError, match=r"unknown MEMIT hyperparameter\(s\) \['learning_rate'\]"):
        MEMITHyperParams.from_json(path)
    with pytest.raises(HyperParamsError, match="hyperparameter 'layers' must be list"):
        MEMITHyperParams.from_dict({**data, "layers": 4})
    with pytest.raises(HyperParamsError, match="'v_lr' must be float"):
        MEMITHyperParams.from_dict({**data, "v_lr": "fast"})
    with pytest.raises(HyperParamsError, match="missing MEMIT hyperparameter"):
        MEMITHyperParams.from_dict({"layers": [1]})
    with pytest.raises(HyperParamsError, match="no MEMIT preset 'nope'"):
        MEMITHyperParams.preset("nope")


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="alg: unknown editing method 'SERAC'"):
        get_editor_class("SERAC")


def test_paper_fields_memit_does_not_read_are_reported_once_and_dropped(caplog):
    data = {**MEMITHyperParams.preset("SmolLM2-135M-Instruct").to_dict(), "v_loss_layer": 29, "ln_f_module": "model.norm"}
    with caplog.at_level(logging.WARNING):
        hparams = MEMITHyperParams.from_dict(data, source="my.json")
        MEMITHyperParams.from_dict(data, source="my.json")
    warnings = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert len(warnings) == 1 and "ln_f_module" in warnings[0] and "v_loss_layer" in warnings[0]
    assert not hasattr(hparams, "v_loss_layer") and "v_loss_layer" not in hparams.to_dict()
    # A field the method does read is not dropped: ROME whitens keys only with mom2_adjustment.
    assert get_editor_class("ROME").hparams_class.preset("gpt2-xl").mom2_adjustment is True


@pytest.mark.parametrize("alg", ["MEMIT", "ROME", "AlphaEdit"])
def test_statistics_dtype_is_checked_for_every_method_with_statistics(alg):
    cls = get_editor_class(alg).hparams_class
    data = cls.preset("SmolLM2-135M-Instruct").to_dict()
    with pytest.raises(HyperParamsError, match="'mom2_dtype': unknown dtype 'float8'"):
        cls.from_dict({**data, "mom2_dtype": "float8"})
