"""Target vectors in the raw form only against the raw and chat forms (``z_prompt_forms``).

    python benchmarks/prompt_forms.py [--hparams SmolLM2-135M-Instruct-chat] [--limit 50] [--threads 2]

In one process on one model: the same CounterFact cases edited in one MEMIT batch twice, from
the unedited model, once with the model's default preset (target vectors optimised on the raw
cloze prompts only, as in the paper) and once with ``--hparams`` (for the default model the
preset ``SmolLM2-135M-Instruct-chat``: raw prompts with two context prefixes and the prompt as
a chat turn, weighted 1 : 2). The cases are held out from every file the preset was chosen on: by default the first
``--limit`` cases of the reduced CounterFact validation split that are not in
``counterfact_subset400.json``. No target-vector cache. Reports the target-vector seconds per
request of each and their ratio, and the efficacy / paraphrase / neighborhood success (the
new target more likely than the true one, or the true more likely for neighbors) with the
prompts as written and as a user turn of the chat template. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from memit import edit_model, load_model
from memit.editing.methods import resolve_hparams
from memit.evaluation.datasets import CounterFactCase, load_cases
from memit.evaluation.datasets.counterfact import evaluate_counterfact_case
from memit.prompt_format import prompt_format

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMIT_SHARED_DATA", REPO.parent / "shared" / "data"))
KINDS = ("efficacy", "paraphrase", "neighborhood")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--hparams", default="SmolLM2-135M-Instruct-chat", help="the preset or file with the chat forms")
    p.add_argument("--data-file", default=str(DATA / "counterfact_mend" / "counterfact-val.json"))
    p.add_argument("--exclude", default=str(DATA / "counterfact_subset400.json"), help="a data file whose case ids are left out")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p.parse_args()


def held_out_cases(args: argparse.Namespace) -> list[CounterFactCase]:
    excluded = {case.case_id for case in load_cases(None, args.exclude)[2]} if args.exclude else set()
    cases = [case for case in load_cases(None, args.data_file)[2] if case.case_id not in excluded]
    return cases[: args.limit]


def success_percent(model, tok, cases: list[CounterFactCase], chat: bool) -> dict[str, float]:
    fmt = prompt_format(tok, chat_template=chat)
    per_case = [evaluate_counterfact_case(model, tok, case, fmt) for case in cases]
    return {kind: 100 * statistics.fmean(m[f"{kind}_success"] for m in per_case) for kind in KINDS}


def scores(model, tok, cases: list[CounterFactCase]) -> dict[str, dict[str, float]]:
    return {form: success_percent(model, tok, cases, form == "chat") for form in ("raw", "chat")}


def run_config(model, tok, hparams, cases: list[CounterFactCase]) -> dict[str, Any]:
    deltas = edit_model(model, tok, [case.request for case in cases], hparams)
    try:
        return {"z_s_per_request": deltas.timings["target_vectors"] / len(cases), **scores(model, tok, cases)}
    finally:
        deltas.revert(model)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype=torch.float32)
    chat_forms = resolve_hparams("MEMIT", args.hparams, model)
    configs = {"raw form (default)": resolve_hparams("MEMIT", None, model), "chat forms": chat_forms}
    cases = held_out_cases(args)
    unedited = scores(model, tok, cases)
    results = {name: run_config(model, tok, hp, cases) for name, hp in configs.items()}
    ratio = results["chat forms"]["z_s_per_request"] / results["raw form (default)"]["z_s_per_request"]
    print(f"{len(cases)} held-out cases of {Path(args.data_file).name} in one batch, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; chat forms: {args.hparams}, z_prompt_forms {chat_forms.z_prompt_forms}")
    header = " ".join(f"{form + ' ' + kind[:5]:>11}" for form in ("raw", "chat") for kind in KINDS)
    print(f"{'configuration':<22} {'z s/request':>11} {header}")
    for name, r in {"unedited": unedited, **results}.items():
        z = f"{r['z_s_per_request']:11.2f}" if "z_s_per_request" in r else " " * 11
        print(f"{name:<22} {z} " + " ".join(f"{r[form][kind]:11.1f}" for form in ("raw", "chat") for kind in KINDS))
    print(f"target vectors per request: {ratio:.2f}x the raw form's time")
    print(json.dumps({"cases": len(cases), "threads": torch.get_num_threads(), "unedited": unedited, "configs": results, "z_time_ratio": ratio}))


if __name__ == "__main__":
    main()
