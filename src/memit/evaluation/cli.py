"""The ``memit evaluate``, ``summarize``, ``scale``, ``targets`` and ``download`` commands."""
from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

import click

from memit.cli_options import edit_options, edit_options_from, model_options
from memit.evaluation.answers import DEFAULT_ANSWER_TOKENS
from memit.evaluation.datasets import DATASETS, DEFAULT_DATASET

log = logging.getLogger(__name__)


def _run_options(func):
    options = [
        click.option("--alg", default="MEMIT", show_default=True, help="Editing method: MEMIT, ROME, FT (FT-W), FT-L, AlphaEdit or MEND (after train-mend)."),
        click.option("--model", "model_name", default="default", show_default=True, help="Hub id, model folder, .gguf file or 'default'."),
        click.option("--dataset", type=click.Choice(list(DATASETS)), default=None, help=f"Data set schema (detected from --data-file if omitted; default {DEFAULT_DATASET})."),
        click.option("--data-file", default=None, type=click.Path(dir_okay=False, exists=True), help="Evaluate this file instead of the data set's default file."),
        click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Data folder (default: $MEMIT_DATA, else $MEMIT_HOME/data)."),
        click.option("--hparams", default=None, help="Hyperparameter JSON file or preset name (default: the model's preset)."),
        click.option("--chat-template", is_flag=True, help="Ask every question as a user turn of the model's chat template (default: the prompts as written)."),
        click.option("--skip-generation", is_flag=True, help="Skip the paper's fluency and consistency (100-token generations; slow on a CPU)."),
        click.option("--generation-tokens", default=100, show_default=True, help="Tokens generated per generation prompt."),
        click.option("--generation-interval", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Fluency and consistency on every N-th case only (cheaper large runs)."),
        click.option("--score-interval", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Score every N-th case only, evenly spaced; every case is still edited (long sequential runs)."),
        click.option("--generated-answers/--no-generated-answers", default=True, show_default=True,
                     help="Greedy answers to every question judged against the targets (gen_* metrics)."),
        click.option("--answer-tokens", default=DEFAULT_ANSWER_TOKENS, show_default=True, help="Most tokens of a generated answer."),
        click.option("--reuse-edits", is_flag=True, help="Keep each batch's weight changes under OUT/.edit_cache and reuse them in runs that make the same edit."),
        click.option("--out", default="results", show_default=True, type=click.Path(file_okay=False), help="Results folder; runs go to OUT/ALG/run_NNN."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _dataset(dataset: str | None, data_file: str | None) -> str | None:
    return dataset if dataset or data_file else DEFAULT_DATASET


@click.command()
@_run_options
@click.option("--num-edits", default=1, show_default=True, help="Cases edited together in one batch.")
@click.option("--sequential-batches", default=1, show_default=True, help="Apply K batches one after another before evaluating them all.")
@click.option("--limit", default=None, type=int, help="Evaluate only the first N cases.")
@click.option("--continue-from-run", default=None, help="Continue a run (run_NNN, NNN or its folder), skipping finished cases.")
@edit_options
@model_options
def evaluate(alg, model_name, dataset, data_file, data_dir, hparams, chat_template, skip_generation, generation_tokens,
             generation_interval, score_interval, generated_answers, answer_tokens, reuse_edits, out, num_edits, sequential_batches, limit, continue_from_run, load, **edit_opts):
    """Edit cases of a data set NUM_EDITS at a time and score each before and after."""
    from memit.evaluation.runner import RunConfig, RunHooks, run_evaluation
    from memit.evaluation.summary import format_table, summarize_run
    from memit.utils.distributed import is_main

    config = RunConfig(
        alg=alg, model=model_name, dataset=_dataset(dataset, data_file), data_file=data_file, data_dir=data_dir,
        num_edits=num_edits, sequential_batches=sequential_batches, limit=limit, hparams=hparams,
        chat_template=chat_template, skip_generation=skip_generation, generation_tokens=generation_tokens,
        generation_interval=generation_interval, score_interval=score_interval, generated_answers=generated_answers, answer_tokens=answer_tokens, reuse_edits=reuse_edits, out=out,
        continue_from_run=continue_from_run, **load,
    )
    start = time.perf_counter()
    run_dir = run_evaluation(config, options=edit_options_from(**edit_opts), hooks=RunHooks(on_start=_say_how_to_continue(hparams)))
    if is_main():  # one table from a torchrun group
        click.echo(format_table(summarize_run(run_dir)))
        click.echo(f"Results in {run_dir} (wall time {time.perf_counter() - start:.0f} s)")


def _say_how_to_continue(hparams: str | None):
    def say(run_dir) -> None:
        from memit.utils.distributed import is_main

        if is_main():
            again = f"memit evaluate --continue-from-run {shlex.quote(str(run_dir))}"
            again += f" --hparams {shlex.quote(hparams)}" if hparams else ""
            click.echo(f"Writing to {run_dir}; if the run is interrupted, continue it with: {again}", err=True)
    return say


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per run instead of tables.")
@click.option("--compare", is_flag=True, help="Print one Markdown table with a row per run (post-edit means) instead.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Also draw the runs' metrics against their number of edits, a line per method, into this PNG.")
def summarize(run_dirs, as_json, compare, plot_path):
    """Mean ± std of each metric over the cases of each run, before (pre) and after (post)."""
    from memit.evaluation.scaling import plot_scaling
    from memit.evaluation.summary import format_comparison, format_table, summaries_json, summarize_run

    summaries = [summarize_run(d) for d in run_dirs]
    if plot_path:
        plot_scaling(summaries, plot_path)
    if as_json:
        click.echo(summaries_json(summaries))
    elif compare:
        click.echo(format_comparison(summaries))
    else:
        click.echo("\n\n".join(format_table(s) for s in summaries))


@click.command()
@_run_options
@click.option("--num-edits", default="1,10,100,1000", show_default=True, help="Comma-separated batch sizes.")
@click.option("--sequential-batches", "checkpoints", default=None,
              help="Comma-separated K: batches of NUM_EDITS (one size) applied K times in sequence, all K x NUM_EDITS cases scored at each K.")
@click.option("--min-cases", default=10, show_default=True, help="Cases evaluated at least per point (whole batches).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), help="PNG to write (default OUT/ALG/scaling_<dataset>.png).")
@edit_options
@model_options
def scale(alg, model_name, dataset, data_file, data_dir, hparams, chat_template, skip_generation, generation_tokens,
          generation_interval, score_interval, generated_answers, answer_tokens, reuse_edits, out, num_edits, checkpoints, min_cases, plot_path, load,
          **edit_opts):
    """Run (or reuse) one evaluation per batch size (or per sequential checkpoint) and plot the metrics against the edits."""
    from memit.evaluation.datasets import load_cases
    from memit.evaluation.runner import RunConfig
    from memit.evaluation.scaling import plot_scaling, run_scaling, run_sequential
    from memit.evaluation.summary import format_table
    from memit.models import load_model
    from memit.utils.distributed import is_main

    try:
        sizes = [int(x) for x in num_edits.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {num_edits!r}", param_hint="--num-edits") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("batch sizes must be positive", param_hint="--num-edits")
    try:
        ks = [int(x) for x in checkpoints.split(",") if x.strip()] if checkpoints else []
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {checkpoints!r}", param_hint="--sequential-batches") from None
    if ks and (len(sizes) != 1 or min(ks) < 1):
        raise click.BadParameter("with --sequential-batches, --num-edits is one batch size and every K is positive", param_hint="--sequential-batches")
    dataset = _dataset(dataset, data_file)
    if dataset is None:
        dataset = load_cases(None, data_file)[0]
    base = RunConfig(alg=alg, model=model_name, dataset=dataset, data_file=data_file, data_dir=data_dir, hparams=hparams,
                     chat_template=chat_template, skip_generation=skip_generation, generation_tokens=generation_tokens,
                     generation_interval=generation_interval, score_interval=score_interval, generated_answers=generated_answers, answer_tokens=answer_tokens, reuse_edits=reuse_edits, out=out, **load)
    model, tok = load_model(model_name, **load)
    options = edit_options_from(**edit_opts)
    if ks:
        summaries = run_sequential(base, sizes[0], ks, model, tok, options=options)
    else:
        summaries = run_scaling(base, sizes, min_cases, model, tok, options=options)
    if not is_main():  # one table and plot from a torchrun group
        return
    for s in summaries:
        click.echo(format_table(s) + "\n")
    path = Path(plot_path or Path(out) / alg / f"{'sequential' if ks else 'scaling'}_{dataset}.png")
    plot_scaling(summaries, path, title=f"{alg} on {model_name}, {dataset}")
    click.echo(f"Plot written to {path}")


@click.command()
@click.option("--alg", default="MEMIT", show_default=True, type=click.Choice(["MEMIT", "AlphaEdit"]),
              help="Method whose target vectors to compute (the two share them).")
@click.option("--model", "model_name", default="default", show_default=True, help="Hub id, model folder, .gguf file or 'default'.")
@click.option("--data-file", required=True, type=click.Path(dir_okay=False, exists=True), help="Cases: CounterFact, MEND CounterFact or zsRE schema.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Only the first N editable cases.")
@click.option("--hparams", default=None, help="Hyperparameter JSON file or preset name (default: the model's preset).")
@edit_options
@model_options
def targets(alg, model_name, data_file, limit, hparams, load, **edit_opts):
    """Compute the target vectors of a data file's editable cases into a target cache, so that
    later runs with that --target-cache skip them (say on a GPU machine, before long runs on
    CPUs). The cache is keyed by the model's weights: load the model in the dtype (--dtype)
    and with the --bf16 setting of the runs that will read it."""
    from memit.editing.common import context_templates, layer_targets
    from memit.editing.methods import get_editor_class, resolve_hparams
    from memit.evaluation.datasets import load_cases
    from memit.evaluation.edit_cache import batch_requests
    from memit.evaluation.runner import editable_cases
    from memit.models import load_model
    from memit.utils.distributed import is_main

    options = edit_options_from(**edit_opts)
    if options.target_cache is None:
        raise click.UsageError("--target-cache (or --use-cache) names the folder to fill")
    model, tok = load_model(model_name, **load)
    hp = resolve_hparams(alg, hparams, model)
    cases, skipped = editable_cases(load_cases(None, data_file)[2], tok, limit)
    requests = batch_requests(cases)
    layout = get_editor_class(alg)(hp, options).layout(model)
    start = time.perf_counter()
    layer_targets(model, tok, layout, requests, hp, context_templates(model, tok, hp, options), options)
    if is_main():
        click.echo(f"{len(requests)} target vectors in {options.target_cache} ({len(skipped)} cases not editable), "
                   f"{time.perf_counter() - start:.0f} s")


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Data folder (default: $MEMIT_DATA, else $MEMIT_HOME/data).")
@click.option("--base-url", default=None, help="Folder URL to fetch every file from (default: each file's own host).")
@click.option("--retries", default=3, show_default=True)
def download(names, data_dir, base_url, retries):
    """Download data sets (cf, mcf, zsre, mquake, known, generation, or file names), each checked against its pinned
    SHA-256 (or the one recorded in the folder on its first download where the host publishes none)."""
    from memit.evaluation import datasets
    from memit.evaluation.download import download as fetch

    for path in fetch(list(names), datasets.data_dir(data_dir), base_url, retries=retries):
        click.echo(f"{path}")

