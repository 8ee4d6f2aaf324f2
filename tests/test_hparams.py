import json

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
