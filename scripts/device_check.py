"""Device check of tracing, tuning, editing and evaluation on an accelerator, with a random
Llama (no download: only the default model's tokenizer files are needed).

    python scripts/device_check.py --device cuda --dtype bfloat16 --tokenizer DIR --data DIR --out DIR

Every step checks that no parameter changed device or dtype and that the model's weights
are back to what they were; the result (timings, metrics, failures) is written to
OUT/device_check.json and printed as the last line. Exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from memit import EditOptions, MEMITHyperParams, get_editor_class, load_model
from memit.evaluation.runner import RunConfig, run_evaluation
from memit.evaluation.summary import summarize_run
from memit.stats import load_corpus
from memit.tracing import TraceConfig, load_knowns, summarize_traces, trace_dataset
from memit.tuning import TuneConfig, tune
from memit.tuning.run import load_tuning_cases

log = logging.getLogger("device_check")
PROMPTS = [("Eiffel Tower", "The Eiffel Tower is located in the city of"), ("Barack Obama", "Barack Obama was born in"),
           ("Toyota", "Toyota is headquartered in"), ("Lionel Messi", "Lionel Messi plays the sport of")]


def random_llama(tokenizer_dir: Path, folder: Path, layers: int, hidden: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # sharper predictions than a random init gives
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def own_knowns(model, tok, path: Path) -> Path:
    """Facts whose attribute is the model's own next token, so it 'knows' them."""
    records = []
    for i, (subject, prompt) in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            top = int(model(**ids).logits[0, -1].argmax())
        records.append({"known_id": i, "subject": subject, "prompt": prompt, "attribute": (tok.decode([top]).strip() or "x") + " more"})
    path.write_text(json.dumps(records))
    return path


def placement(model) -> dict[str, tuple[str, torch.dtype]]:
    return {n: (str(p.device), p.dtype) for n, p in model.named_parameters()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokenizer", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="holds counterfact_subset400.json and counterfact_mend/counterfact-train.json")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.out / "random-llama"
    random_llama(args.tokenizer, folder, args.layers, args.hidden)
    model, tok = load_model(str(folder), dtype=args.dtype, device=args.device)
    before = placement(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "mlp.down_proj" in n}
    report: dict[str, Any] = {"device": str(model.device), "dtype": str(model.dtype), "torch": torch.__version__, "steps": {}, "failures": []}
    if model.device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(model.device)
    options = EditOptions(stats_dir=str(args.out / "stats"), corpus="wikipedia-sample", batch_size=8)
    hp = dataclasses.replace(MEMITHyperParams.preset("SmolLM2-135M-Instruct"), layers=[2, 3, 4], v_num_grad_steps=10,
                             mom2_n_samples=64, mom2_max_tokens=128, context_template_length_params=[[5, 2]])

    def step(name: str, run: Callable[[], Any]) -> None:
        start = time.perf_counter()
        try:
            report["steps"][name] = {"result": run()}
            if placement(model) != before:
                raise AssertionError("a parameter changed device or dtype")
            changed = [n for n, w in weights.items() if not torch.equal(model.get_parameter(n), w)]
            if changed:
                raise AssertionError(f"weights not restored: {changed[:3]}")
        except Exception as err:  # report every step, then fail at the end
            report["failures"].append(f"{name}: {type(err).__name__}: {err}")
            report["steps"][name] = {"error": traceback.format_exc(limit=4)}
        report["steps"][name]["seconds"] = round(time.perf_counter() - start, 2)
        if model.device.type == "cuda":
            report["steps"][name]["peak_gib"] = round(torch.cuda.max_memory_allocated(model.device) / 2**30, 3)

    def traced() -> dict:
        knowns = load_knowns(own_knowns(model, tok, args.out / "known.json"))
        trace_dataset(model, tok, knowns, args.out / "trace", TraceConfig(samples=3, window=3))
        return {k: v["num_traces"] for k, v in summarize_traces(args.out / "trace", plots=1).items()}

    def tuned() -> dict:
        cases = load_tuning_cases(tok, args.data / "counterfact_mend" / "counterfact-train.json", None,
                                  [args.data / "counterfact_subset400.json"], count=4)[0]
        config = TuneConfig(num_layers=3, lambdas=(10.0, 1000.0), lambda_refinements=(3.0,), lr_factors=(2.0,), step_factors=(2.0,),
                            sample_sizes=(32, 64))
        effect = [1.0 / (1 + abs(i - 3)) for i in range(args.layers)]
        result = tune(model, tok, cases, hp, effect, load_corpus("wikipedia-sample"), args.out / "tune", config, options)
        return {"layers": result.hparams.layers, "lambda": result.hparams.mom2_update_weight, "unedited": result.unedited["score"],
                "chosen": result.provenance["chosen"], "trials": len(result.results)}

    def edited(alg: str) -> Callable[[], dict]:
        def run() -> dict:
            cls = get_editor_class(alg)
            params = cls.hparams_class.from_dict({k: v for k, v in hp.to_dict().items() if k in {f.name for f in dataclasses.fields(cls.hparams_class)}})
            requests = [{"prompt": "{} plays the sport of", "subject": s, "target_new": {"str": "football"}} for s, _ in PROMPTS]
            edit = cls(params, options).edit(model, tok, requests)
            moved = [n for n, d in edit.deltas.items() if d.device != model.get_parameter(n).device]
            edit.revert(model)
            if moved:
                raise AssertionError(f"deltas on another device than their weights: {moved}")
            return {"timings": {k: round(v, 2) for k, v in edit.timings.items()}}
        return run

    def evaluated() -> dict:
        config = RunConfig(alg="MEMIT", model=str(folder), data_file=str(args.data / "counterfact_subset400.json"), limit=4, num_edits=2,
                           device=args.device, dtype=args.dtype, generation_tokens=20, answer_tokens=8, out=str(args.out / "eval"))
        run_dir = run_evaluation(config, model, tok, hp, options)
        summary = summarize_run(run_dir)
        return {"cases": summary.num_cases, "post_score": summary.score("post")}

    step("trace", traced)
    step("tune", tuned)
    step("edit_memit", edited("MEMIT"))
    step("edit_alphaedit", edited("AlphaEdit"))
    step("evaluate", evaluated)
    (args.out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, default=str))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
