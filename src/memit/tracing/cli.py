"""The ``memit trace`` command."""
from __future__ import annotations

import click

from memit.cli_options import model_options


@click.command()
@click.option("--model", "model_name", default="default", show_default=True, help="Hub id, model folder, .gguf file or 'default'.")
@click.option("--data-file", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Known facts in ROME's known_1000.json schema (default: known_1000.json in the data folder; `memit download known`).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Data folder (default: $MEMIT_DATA, else $MEMIT_HOME/data).")
@click.option("--limit", default=None, type=int, help="Trace the first N facts the model predicts.")
@click.option("--kinds", default="hidden,mlp,attn", show_default=True, help="States to restore: hidden, mlp, attn (comma-separated).")
@click.option("--samples", default=10, show_default=True, help="Noise samples per prompt.")
@click.option("--window", default=10, show_default=True, help="Consecutive layers restored together for mlp and attn.")
@click.option("--all-facts", is_flag=True, help="Trace every fact, not only those whose attribute the model predicts.")
@click.option("--chat-template", is_flag=True, help="Ask each fact as a user turn of the model's chat template.")
@click.option("--plots", default=3, show_default=True, help="Heat maps of this many single facts per kind.")
@click.option("--out", default="results/trace", show_default=True, type=click.Path(file_okay=False), help="Run folder (continued if it exists).")
@model_options
def trace(model_name, data_file, data_dir, limit, kinds, samples, window, all_facts, chat_template, plots, out, load):
    """Causal tracing: which layers' states carry the facts the model knows."""
    from pathlib import Path

    from memit.evaluation.datasets import data_dir as default_data_dir
    from memit.models import load_model
    from memit.tracing import TraceConfig, load_knowns, summarize_traces, trace_dataset

    config = TraceConfig(kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()), samples=samples, window=window,
                         limit=limit, known_only=not all_facts, chat_template=chat_template)
    path = Path(data_file) if data_file else default_data_dir(data_dir) / "known_1000.json"
    if not path.is_file():
        raise click.ClickException(f"data file {path} does not exist; run `memit download known` or pass --data-file")
    knowns = load_knowns(path)
    model, tok = load_model(model_name, **load)
    trace_dataset(model, tok, knowns, out, config)
    averages = summarize_traces(out, config.kinds, plots)
    click.echo(f"Average indirect effect at the last subject token ({out}):")
    click.echo(f"{'kind':<8}{'facts':>7}{'clean p':>9}{'corrupted p':>13}  peak layer (effect)")
    for kind, average in averages.items():
        effect = average["effect"]["last subject"]
        peak = max(range(len(effect)), key=effect.__getitem__)
        click.echo(f"{kind:<8}{average['num_traces']:>7}{average['high']:>9.3f}{average['low']:>13.3f}  {peak} ({effect[peak]:.3f})")
    click.echo(f"Plots: {out}/average_<kind>.png, {out}/last_subject_token.png, {out}/heatmaps/")
