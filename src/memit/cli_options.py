"""Options shared by the commands: editing options, and how to load the model."""
from __future__ import annotations

import functools

import click

# memit.stats.second_moment.DEFAULT_BATCH_TOKENS (its arithmetic is there), repeated so that
# the command line starts without importing torch; a test checks that the two agree.
STATS_BATCH_TOKENS = 8192


def edit_options(func):
    """Options shared by every command that edits."""
    options = [
        click.option("--corpus", default=None, help="Corpus for key statistics: a .txt/.jsonl(.gz) file or a dataset name (default: $MEMIT_CORPUS, else the preset's)."),
        click.option("--stats-dir", default=None, type=click.Path(file_okay=False), help="Where key statistics are cached (default: $MEMIT_HOME/stats)."),
        click.option("--stats-batch-tokens", default=STATS_BATCH_TOKENS, show_default=True, type=click.IntRange(min=1), help="Tokens per forward pass when computing key statistics (padding included; sets the memory, not the statistics). The default fits an 8B bfloat16 model on a 24 GB GPU."),
        click.option("--batch-size", default=16, show_default=True, help="Requests whose target vectors are optimised together."),
        click.option("--plain", is_flag=True, help="Use the reference one-request-at-a-time computation."),
        click.option("--bf16", is_flag=True, help="bfloat16 autocast for forward passes."),
        click.option("--use-cache", is_flag=True, help="Reuse target vectors cached per request ($MEMIT_HOME/targets; see --target-cache)."),
        click.option("--target-cache", default=None, type=click.Path(file_okay=False), help="Folder of cached target vectors (implies --use-cache)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def edit_options_from(corpus, stats_dir, stats_batch_tokens, batch_size, plain, bf16, use_cache=False, target_cache=None):
    from memit.editing.base import EditOptions
    from memit.editing.target_cache import default_target_cache

    if use_cache and target_cache is None:
        target_cache = str(default_target_cache())
    options = EditOptions(
        stats_dir=stats_dir, stats_batch_tokens=stats_batch_tokens, batch_size=1 if plain else batch_size, fast=not plain, autocast=bf16,
        target_cache=target_cache,
    )
    if corpus:
        options.corpus = corpus
    return options


def model_options(func):
    """``--device``, ``--dtype``, ``--device-map`` and ``--offload-folder`` for every command that
    loads a model; the command receives them as one ``load`` dict of ``load_model`` keywords."""
    options = [
        click.option("--device", default="auto", show_default=True, help="auto (CUDA when present, else MPS, else CPU), cpu, cuda, cuda:N or mps."),
        click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="Precision the model is loaded in (auto: the checkpoint's)."),
        click.option("--device-map", default=None, help="Place layers with accelerate instead of --device: 'auto' or a JSON file of module name -> device ('cpu', 'cuda:N', 'disk')."),
        click.option("--offload-folder", default=None, type=click.Path(file_okay=False), help="Where layers mapped to 'disk' are kept."),
    ]

    @functools.wraps(func)
    def with_load(*args, device, dtype, device_map, offload_folder, **kwargs):
        load = {"device": device, "dtype": dtype, "device_map": device_map, "offload_folder": offload_folder}
        return func(*args, load=load, **kwargs)

    for option in reversed(options):
        with_load = option(with_load)
    return with_load
