"""``memit export``: saved edits as a PEFT LoRA adapter, a merged Hugging Face folder or a patched GGUF."""
from __future__ import annotations

import click

from memit.cli_options import model_options


@click.command("export")
@click.argument("edits_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(["peft", "hf", "gguf"]), help="peft: a LoRA adapter; hf: the merged model; gguf: --base with the edited tensors replaced.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (written whole or not at all).")
@click.option("--model", "model_name", default=None, help="The model the edits were made for (default: the one their manifest names, else 'default'). An exact peft export needs none.")
@click.option("--rank", default=None, type=click.IntRange(min=1), help="peft: keep this many singular values per matrix (default: the exact rank).")
@click.option("--energy", default=None, type=click.FloatRange(0, 1, min_open=True), help="peft: keep the fewest singular values holding this share of each delta's squared norm.")
@click.option("--base", default=None, type=click.Path(dir_okay=False), help="gguf: the base GGUF file to patch.")
@click.option("--edited-type", default=None, type=click.Choice(["f32", "f16", "bf16", "q8_0"]), help="gguf: write the edited tensors in this type (for a quantised type that would round the edit away).")
@model_options
def export(edits_dir, fmt, out_dir, model_name, rank, energy, base, edited_type, load):
    """Write the edits in EDITS_DIR (saved deltas or an edit chain) where models are served."""
    from memit.chain import load_edits
    from memit.export import export as write

    if fmt != "peft" and (rank is not None or energy is not None):
        raise click.BadParameter("truncation applies to --format peft", param_hint="--rank/--energy")
    if rank is not None and energy is not None:
        raise click.BadParameter("give one of them", param_hint="--rank/--energy")
    if (fmt == "gguf") != (base is not None):
        raise click.BadParameter("--format gguf needs --base FILE.gguf, and only it takes one", param_hint="--base")
    edits = load_edits(edits_dir)
    model = tok = None
    if model_name is not None or fmt != "peft" or rank is not None or energy is not None:
        from memit.models import load_model

        model, tok = load_model(model_name or edits.manifest.get("model_name") or "default", **load)
    report = write(edits, out_dir, fmt, model=model, tok=tok, base=base, rank=rank, energy=energy, edited_type=edited_type)
    for line in summary(report):
        click.echo(line)
    click.echo(f"Exported to {out_dir}")


def summary(report: dict) -> list[str]:
    """What the export report says, in a few lines."""
    if report["format"] == "peft":
        ranks = sorted({m["rank"] for m in report["modules"].values()})
        lines = [
            f"LoRA adapter: {len(report['modules'])} module(s), rank {'/'.join(map(str, ranks))}, "
            f"max relative reconstruction error {report['max_relative_error']:.3g}",
            f"Size: {report['adapter_bytes']:,} bytes (the full edited matrices: {report['full_matrices_bytes']:,})",
        ]
        if "efficacy" in report:
            eff = report["efficacy"]
            lines.append(f"Efficacy on the edits' prompts: {_share(eff['adapter'])} with the adapter, {_share(eff['exact_deltas'])} with the exact deltas")
        return lines
    if report["format"] == "gguf":
        return [
            f"{name} ({t['type']}{'' if t['type'] == t['base_type'] else ', was ' + t['base_type']}): "
            f"quantisation error {t['error_of_delta']:.1%} of the edit"
            for name, t in report["tensors"].items()
        ]
    return [f"Merged model with {len(report['edited_weights'])} edited weight(s) and {report['requests']} edit(s)"]


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"
