"""Editing options shared by every command that edits."""
from __future__ import annotations

import click


def edit_options(func):
    """Options shared by every command that edits."""
    options = [
        click.option("--corpus", default=None, help="Corpus for key statistics: a .txt/.jsonl(.gz) file or a dataset name (default: $MEMIT_CORPUS, else the preset's)."),
        click.option("--stats-dir", default=None, type=click.Path(file_okay=False), help="Where key statistics are cached (default: $MEMIT_HOME/stats)."),
        click.option("--batch-size", default=16, show_default=True, help="Requests whose target vectors are optimised together."),
        click.option("--plain", is_flag=True, help="Use the reference one-request-at-a-time computation."),
        click.option("--bf16", is_flag=True, help="bfloat16 autocast for forward passes."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def edit_options_from(corpus, stats_dir, batch_size, plain, bf16):
    from memit.editing.base import EditOptions

    options = EditOptions(stats_dir=stats_dir, batch_size=1 if plain else batch_size, fast=not plain, autocast=bf16)
    if corpus:
        options.corpus = corpus
    return options
