"""The ``memit tune`` command."""
from __future__ import annotations

import click

from memit.cli_options import edit_options, edit_options_from, model_options

TABLE_COLUMNS = ("stage", "layers", "v_lr", "v_num_grad_steps", "mom2_update_weight", "mom2_n_samples",
                 "efficacy", "paraphrase", "neighborhood", "score", "update_norm", "update_change", "seconds")


def _numbers(kind):
    def parse(ctx, param, value):
        try:
            return tuple(kind(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    return parse


@click.command()
@click.option("--model", "model_name", default="default", show_default=True, help="Hub id, model folder, .gguf file or 'default'.")
@click.option("--alg", default="MEMIT", show_default=True, type=click.Choice(["MEMIT"]), help="Method whose hyperparameters are tuned.")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="Where the tuned preset (JSON) is written.")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False), help="Trials, target vectors and traces, for resuming (default: OUT without .json, plus .tune).")
@click.option("--hparams", default=None, help="Preset or file to start from (default: the model's preset, else the default model's).")
@click.option("--data-file", default=None, type=click.Path(dir_okay=False, exists=True),
              help="CounterFact requests to tune on (default: counterfact_mend/counterfact-train.json in the data folder).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Data folder (default: $MEMIT_DATA, else $MEMIT_HOME/data).")
@click.option("--exclude", "exclude_files", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Evaluation files whose cases (by case id or subject) must not be tuned on; repeatable.")
@click.option("--edits", default=10, show_default=True, type=click.IntRange(min=1), help="Requests edited together in each trial (the batch size you will edit with).")
@click.option("--num-layers", default=5, show_default=True, type=click.IntRange(min=1), help="Width of the edit-layer window.")
@click.option("--lambdas", default="10,100,1000,10000,100000", show_default=True, callback=_numbers(float), help="λ (mom2_update_weight) values of the first stage.")
@click.option("--sample-sizes", default="250,500,1000,2000", show_default=True, callback=_numbers(int), help="Statistics sizes compared (the search uses the largest).")
@click.option("--budget-minutes", default=None, type=float, help="Start no trial after this many minutes; the best setting so far is written.")
@click.option("--known-file", default=None, type=click.Path(dir_okay=False, exists=True), help="Known facts to trace (default: known_1000.json in the data folder).")
@click.option("--trace-dir", default=None, type=click.Path(file_okay=False), help="A `memit trace` folder to read (or trace into; default: WORK_DIR/trace).")
@click.option("--trace-facts", default=20, show_default=True, help="Known facts traced when no trace exists.")
@click.option("--trace-samples", default=5, show_default=True, help="Noise samples per traced fact.")
@click.option("--seed", default=0, show_default=True, help="Chooses the tuning requests.")
@edit_options
@model_options
def tune(model_name, alg, out_file, work_dir, hparams, data_file, data_dir, exclude_files, edits, num_layers, lambdas, sample_sizes,
         budget_minutes, known_file, trace_dir, trace_facts, trace_samples, seed, load, **edit_opts):
    """Tune MEMIT for a model: edit layers from causal traces, then λ, the target-vector
    optimisation and the statistics size by measured edits on held-out CounterFact requests."""
    import time
    from pathlib import Path

    from memit.models import load_model
    from memit.tuning.run import load_tuning_cases, mlp_effect_at_last_subject, starting_hparams
    from memit.tuning.search import TuneConfig
    from memit.tuning.search import tune as run_tune
    from memit.utils.distributed import is_main
    from memit.utils.io import write_json

    started = time.perf_counter()
    out = Path(out_file)
    work = Path(work_dir) if work_dir else out.with_name(out.stem + ".tune")
    options = edit_options_from(**edit_opts)
    config = TuneConfig(num_layers=num_layers, lambdas=lambdas, sample_sizes=sample_sizes, budget_minutes=budget_minutes)
    model, tok = load_model(model_name, **load)
    base = starting_hparams(model_name, hparams)
    cases, source = load_tuning_cases(tok, data_file, data_dir, exclude_files, edits, seed)
    effect = mlp_effect_at_last_subject(model, tok, Path(trace_dir) if trace_dir else work / "trace",
                                        known_file, data_dir, trace_facts, trace_samples)
    from memit.stats.corpus import resolve_corpus

    corpus = resolve_corpus(options.corpus, base.mom2_dataset, model, tok)
    provenance = {"model": model_name, "tuning_file": str(source), "excluded_files": list(exclude_files), "edits_per_trial": edits}
    result = run_tune(model, tok, cases, base, effect, corpus, work, config, options, provenance)
    result.provenance["seconds"]["this_invocation"] = round(time.perf_counter() - started, 1)
    if not is_main():  # every process of a torchrun group measured the same trials
        return
    write_json(out, result.preset())

    rows = result.provenance["trials"]
    click.echo(f"Unedited: efficacy {result.unedited['efficacy']:.2f} paraphrase {result.unedited['paraphrase']:.2f} "
               f"neighborhood {result.unedited['neighborhood']:.2f} Score {result.unedited['score']:.3f}")
    click.echo("  ".join(TABLE_COLUMNS))
    for row in rows:
        click.echo("  ".join("-" if row[c] is None else f"{row[c]:g}" if isinstance(row[c], float) else str(row[c]) for c in TABLE_COLUMNS))
    if result.provenance["skipped_for_budget"]:
        click.echo(f"{len(result.provenance['skipped_for_budget'])} trials skipped: the budget ran out")
    hp = result.hparams
    click.echo(f"Chosen: layers {hp.layers}, v_lr {hp.v_lr:g}, v_num_grad_steps {hp.v_num_grad_steps}, "
               f"mom2_update_weight {hp.mom2_update_weight:g}, mom2_n_samples {hp.mom2_n_samples}; Score {result.provenance['chosen']['score']:.3f}")
    click.echo(f"Wrote {out} ({time.perf_counter() - started:.0f} s)")
