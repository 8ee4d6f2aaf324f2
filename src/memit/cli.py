"""The ``memit`` command line."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from memit.cli_options import edit_options, edit_options_from, model_options
from memit.errors import MemitError
from memit.utils.io import atomic_dir, write_json


class _Group(click.Group):
    """Shows what the user can fix (a malformed request, an unknown hyperparameter, a missing
    file: a `MemitError`) as a one-line error; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MemitError as err:
            raise click.ClickException(str(err)) from err


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Mass-edit facts in a causal language model and measure the result."""
    from memit.utils.distributed import init_from_environment

    init_from_environment()  # under torchrun: statistics, target vectors and scoring are split across the processes
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    configured = bool(logging.getLogger().handlers)  # by the caller of main(), e.g. tests
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not sys.stderr.isatty():
        # Library bars (weight loading, GGUF conversion) would fill a log file with carriage returns.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if verbose == 0 and not configured:
        # Long steps still report their progress (a tqdm bar in a terminal, else a line a minute).
        from memit.utils.progress import show_progress_lines

        show_progress_lines(logging.getLogger().handlers)


@main.command()
@click.option("--model", "model_name", default="default", show_default=True, help="Hub id, model folder, .gguf file or 'default'.")
@click.option("--requests", "requests_file", default=None, type=click.Path(dir_okay=False), help="JSON list of requests (required unless --revert).")
@click.option("--hparams", default=None, help="Hyperparameter JSON file or preset name (default: the model's preset).")
@click.option("--alg", default=None, help="Editing method: MEMIT (default), ROME, FT (FT-W), FT-L, AlphaEdit or MEND (after train-mend).")
@click.option("--save", "save_dir", default=None, type=click.Path(file_okay=False), help="Save the edited model here (with --deltas-only, just the deltas; with --format, an export).")
@click.option("--deltas-only", is_flag=True, help="With --save, write only the weight deltas and their manifest.")
@click.option("--format", "export_format", default=None, type=click.Choice(["peft", "hf", "gguf"]),
              help="With --save, write the edit where models are served instead: a PEFT LoRA adapter (exact rank), "
              "the merged model as a Hugging Face folder, or --base with the edited tensors replaced (as `memit export`).")
@click.option("--base", "gguf_base", default=None, type=click.Path(exists=True, dir_okay=False), help="With --format gguf: the base GGUF file to patch.")
@click.option("--edited-type", default=None, type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
              help="With --format gguf: write the edited tensors in this type (for a quantised base type that would round the edit away).")
@click.option("--report", default=None, type=click.Path(dir_okay=False), help="Write before/after predictions as JSON.")
@click.option(
    "--on-top-of", "earlier_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
    help="Saved deltas (from --save DIR --deltas-only) to apply first, oldest first; repeatable. "
    "The new edit is made on top of them, and AlphaEdit (or MEMIT with a preserve_weight) preserves them.",
)
@click.option(
    "--chain", "chain_dir", default=None, type=click.Path(file_okay=False),
    help="An edit chain folder: the requests are edited on top of its batches and appended as a new batch "
    "(a new chain is started with --alg and --hparams when the folder holds none).",
)
@click.option("--revert", "revert_batches", default=None, type=click.IntRange(min=1),
              help="With --chain: take the chain's last N batches back first.")
@click.option("--force", is_flag=True, help="Apply --on-top-of deltas even when their manifest names another model.")
@edit_options
@model_options
def edit(model_name, requests_file, hparams, alg, save_dir, deltas_only, export_format, gguf_base, edited_type, report, earlier_dirs,
         chain_dir, revert_batches, force, load, **edit_opts):
    """Apply the edits in REQUESTS and show each prompt's predictions before and after."""
    from memit.api import edit_model
    from memit.cli_report import describe_predictions, print_report
    from memit.deltas import WeightDeltas
    from memit.models import load_model
    from memit.requests import check_tokenization, load_requests
    from memit.utils.distributed import is_main

    _check_edit_arguments(requests_file, chain_dir, revert_batches, earlier_dirs, hparams, alg)
    _check_export_arguments(save_dir, deltas_only, export_format, gguf_base, edited_type, chain_dir, earlier_dirs)
    requests = load_requests(requests_file) if requests_file else []
    model, tok = load_model(model_name, **load)
    check_tokenization(requests, tok)
    options = edit_options_from(**edit_opts)
    if chain_dir:
        chain = _open_chain(chain_dir, model, tok, alg, hparams, options)
        if revert_batches:
            chain.revert(revert_batches)
            click.echo(f"Reverted {revert_batches} batch(es); the chain in {chain_dir} has {len(chain)}")
        if not requests:
            return
        edit_fn = chain.edit
    else:
        # All checked before any is applied: a damaged or foreign one leaves the model untouched.
        earlier = [WeightDeltas.load(folder) for folder in earlier_dirs]
        for saved in earlier:
            saved.check(model, force)
        earlier = [saved.apply(model, force=force) for saved in earlier]
        edit_fn = lambda reqs: edit_model(model, tok, reqs, hparams, alg or "MEMIT", options=options, earlier=earlier)  # noqa: E731
    before = describe_predictions(model, tok, requests)
    deltas = edit_fn(requests)
    after = describe_predictions(model, tok, requests)
    if not is_main():  # every process of a torchrun group made the same edit; one reports it
        return
    if chain_dir:
        click.echo(f"Batch {len(chain)} of the chain in {chain_dir}")
    print_report(requests, before, after)
    if report:
        write_json(report, [{"request": r.to_dict(), "pre": b, "post": a} for r, b, a in zip(requests, before, after)])
    if save_dir and export_format:
        from memit.export.cli import summary

        # The exporters write their folder atomically themselves.
        exported = deltas.export(save_dir, export_format, model=model, tok=tok, base=gguf_base, edited_type=edited_type)
        for line in summary(exported):
            click.echo(line)
        click.echo(f"Exported ({export_format}) to {save_dir}")
    elif save_dir:
        with atomic_dir(save_dir) as folder:
            if deltas_only:
                deltas.save(folder)
            else:
                model.save_pretrained(folder)
                tok.save_pretrained(folder)
                deltas.save(folder / "memit_deltas")
        click.echo(f"Saved to {save_dir}")


def _check_edit_arguments(requests_file, chain_dir, revert_batches, earlier_dirs, hparams, alg) -> None:
    from memit.chain import CHAIN_FILE

    if not requests_file and not revert_batches:
        raise click.UsageError("give --requests (or --chain DIR --revert N)")
    if revert_batches and not chain_dir:
        raise click.BadParameter("needs --chain", param_hint="--revert")
    if chain_dir and earlier_dirs:
        raise click.BadParameter("a chain holds its earlier edits itself; give --chain or --on-top-of", param_hint="--on-top-of")
    if chain_dir and (Path(chain_dir) / CHAIN_FILE).is_file() and (hparams or alg):
        raise click.BadParameter(f"the chain in {chain_dir} edits with its own method and hyperparameters", param_hint="--alg/--hparams")


def _check_export_arguments(save_dir, deltas_only, export_format, gguf_base, edited_type, chain_dir, earlier_dirs) -> None:
    """``--format`` (and its ``--base`` / ``--edited-type``) go with ``--save`` and not with
    ``--deltas-only``; peft and gguf hold this edit's deltas alone, so they are refused where the
    model holds earlier edits too (a chain is exported whole with ``memit export CHAIN_DIR``)."""
    if export_format is None:
        if gguf_base is not None or edited_type is not None:
            raise click.BadParameter("only with --save DIR --format gguf", param_hint="--base/--edited-type")
        return
    if not save_dir:
        raise click.BadParameter("needs --save DIR (the export's folder)", param_hint="--format")
    if deltas_only:
        raise click.BadParameter("give --deltas-only or --format, not both", param_hint="--format")
    if (export_format == "gguf") != (gguf_base is not None):
        raise click.BadParameter("--format gguf needs --base FILE.gguf, and only it takes one", param_hint="--base")
    if edited_type is not None and export_format != "gguf":
        raise click.BadParameter("only with --format gguf", param_hint="--edited-type")
    if chain_dir:
        raise click.BadParameter(
            f"an edit chain is exported whole, after the edit: memit export {chain_dir} --format {export_format} --out DIR",
            param_hint="--format",
        )
    if earlier_dirs and export_format != "hf":
        raise click.BadParameter(
            f"a {export_format} export of --save holds this edit alone, not the --on-top-of deltas; "
            "use --format hf (the whole edited model), or an edit chain (--chain) and `memit export CHAIN_DIR`",
            param_hint="--format",
        )


def _open_chain(chain_dir, model, tok, alg, hparams, options):
    from memit.chain import CHAIN_FILE, EditChain

    if (Path(chain_dir) / CHAIN_FILE).is_file():
        return EditChain.load(chain_dir, model, tok, options)
    return EditChain.start(model, tok, alg or "MEMIT", hparams, chain_dir, options)


@main.command("train-mend")
@click.option("--model", "model_name", default="default", show_default=True, help="Hub id, model folder, .gguf file or 'default'.")
@click.option("--data-file", required=True, type=click.Path(exists=True, dir_okay=False), help="Training cases: CounterFact, MEND CounterFact or zsRE schema.")
@click.option("--exclude-data-file", multiple=True, type=click.Path(exists=True, dir_okay=False), help="Leave out the case ids of this file (the evaluation set); repeatable.")
@click.option("--hparams", default=None, help="MEND hyperparameter JSON file or preset name (default: the model's preset).")
@click.option("--steps", type=int, default=None, help="Training steps (default: the hyperparameters' train_steps).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Folder for the network (default: $MEMIT_HOME/mend/<model fingerprint>, where MEND looks).")
@click.option("--seed", default=0, show_default=True)
@model_options
def train_mend(model_name, data_file, exclude_data_file, hparams, steps, out, seed, load):
    """Train MEND's editor network for a model, so that `--alg MEND` can edit it."""
    import dataclasses
    import shutil

    from memit.editing.mend.main import MENDEditor, default_network_dir
    from memit.editing.mend.train import train_mend as train
    from memit.editing.methods import resolve_hparams
    from memit.evaluation.datasets import load_cases, training_examples
    from memit.models import load_model

    model, tok = load_model(model_name, **load)
    hp = resolve_hparams("MEND", hparams, model)
    if steps is not None:
        hp = dataclasses.replace(hp, train_steps=steps)
    excluded = {c.case_id for path in exclude_data_file for c in load_cases(None, path)[2]}
    dataset, _, cases = load_cases(None, data_file)
    cases = [c for c in cases if c.case_id not in excluded]
    layout = MENDEditor(hp).layout(model)
    folder = Path(out) if out else default_network_dir(model)
    # A killed training continues from its last checkpoint when started again.
    checkpoint = folder / "checkpoint"
    network = train(model, tok, layout, hp, training_examples(cases, dataset), seed=seed, checkpoint_dir=checkpoint)
    network.save(folder)
    shutil.rmtree(checkpoint, ignore_errors=True)
    click.echo(f"Trained on {len(cases)} cases ({len(excluded)} ids excluded); network saved to {folder}")


DEMO_REQUESTS = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}, "target_true": {"str": "basketball"}},
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": {"str": "baseball"}, "target_true": {"str": "basketball"}},
]


@main.command()
@click.option("--model", "model_name", default="default", show_default=True)
@edit_options
@model_options
def demo(model_name, load, **edit_opts):
    """Teach the default model that LeBron James plays football and Michael Jordan baseball."""
    from memit.api import edit_model
    from memit.cli_report import describe_predictions, print_report
    from memit.models import load_model
    from memit.predict import generate
    from memit.requests import parse_requests
    from memit.utils.distributed import is_main

    requests = parse_requests(DEMO_REQUESTS)
    model, tok = load_model(model_name, **load)
    prompts = ["LeBron James plays the sport of", "Michael Jordan is best known for playing"]
    before = describe_predictions(model, tok, requests)
    texts_before = [generate(model, tok, p) for p in prompts]
    click.echo("Editing (the first run computes key statistics, a few minutes on a CPU)...")
    deltas = edit_model(model, tok, requests, options=edit_options_from(**edit_opts))
    after = describe_predictions(model, tok, requests)
    if not is_main():  # every process of a torchrun group made the same edit; one reports it
        return
    print_report(requests, before, after)
    for prompt, text in zip(prompts, texts_before):
        click.echo(f"\nGeneration for {prompt!r}\n  before: {text!r}\n  after:  {generate(model, tok, prompt)!r}")
    deltas.revert(model)


@main.command()
@click.option("--model", "model_name", default="default", show_default=True, help="Hub id, model folder, .gguf file or 'default'.")
@click.option("--edits", "edits_dir", default=None, type=click.Path(exists=True, file_okay=False), help="Saved deltas to apply first (from /save or memit edit --save DIR --deltas-only).")
@click.option("--chain", "chain_dir", default=None, type=click.Path(file_okay=False), help="An edit chain folder: loaded, and /edit appends to it (a new chain is started when it holds none).")
@click.option("--compare", is_flag=True, help="After each answer of the edited model, the unedited model's answer (the same weights, edits taken out and put back).")
@click.option("--hparams", default=None, help="Hyperparameters of /edit: a JSON file or preset name (default: the model's preset).")
@click.option("--alg", default=None, help="Method of /edit: MEMIT (default), ROME, FT (FT-W), FT-L, AlphaEdit or MEND (after train-mend).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1), help="Longest answer, in tokens.")
@edit_options
@model_options
def chat(model_name, edits_dir, chain_dir, compare, hparams, alg, max_new_tokens, load, **edit_opts):
    """Chat with the (edited) model in its chat template; /edit, /undo and /save edit facts on the spot."""
    from memit.chat import chat_loop, open_session
    from memit.models import load_model

    if edits_dir and chain_dir:
        raise click.BadParameter("give --edits or --chain, not both", param_hint="--edits/--chain")
    model, tok = load_model(model_name, **load)
    session = open_session(model, tok, edits_dir, chain_dir, hparams, alg, edit_options_from(**edit_opts), max_new_tokens)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    chat_loop(session, compare=compare)


from memit.evaluation import cli as _evaluation_cli  # noqa: E402  (evaluation commands)

main.add_command(_evaluation_cli.evaluate)
main.add_command(_evaluation_cli.summarize)
main.add_command(_evaluation_cli.scale)
main.add_command(_evaluation_cli.targets)
main.add_command(_evaluation_cli.download)

from memit.tracing.cli import trace as _trace  # noqa: E402

main.add_command(_trace)

from memit.tuning.cli import tune as _tune  # noqa: E402

main.add_command(_tune)

from memit.export.cli import export as _export  # noqa: E402

main.add_command(_export)
