"""Issue 13's tables and plots from the run folders of ``scripts/paper_experiments.sh``: per part
(scaling, sequential) the comparison table, the hours each run took and its plot; for the
scaling curve, the update's size, what the solves left unwritten and what the target-vector
cache saved; for the sequential runs, success by the edits' age.

    python scripts/paper_report.py [--results results] [--figures docs/evaluation]
"""
from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

from memit.editing.target_cache import cache_cost
from memit.evaluation.scaling import edits_so_far, plot_scaling
from memit.evaluation.summary import RunSummary, format_comparison, load_case_records, markdown_table, summarize_run

PARTS = {"scaling": "paper_scaling", "sequential": "paper_sequential", "sequential, AlphaEdit ridge 10": "alphaedit_probe"}
TARGET_CACHE = ".target_cache"  # the scaling curve's, as paper_experiments.sh sets it


def finished_runs(folder: Path) -> list[RunSummary]:
    """The runs whose every case is scored, by method then number of edits."""
    summaries = []
    for params in sorted(folder.glob("*/run_*/params.json")):
        summary = summarize_run(params.parent)
        config = summary.params["config"]
        if summary.num_cases and summary.num_cases == config.get("limit"):
            summaries.append(summary)
    return sorted(summaries, key=lambda s: (s.params["config"]["alg"], edits_so_far(s)))


@functools.cache
def case_records(run_dir: Path) -> list[dict]:
    """A run's case files, read once for all the tables."""
    return load_case_records(run_dir)


def target_seconds(summary: RunSummary) -> float:
    """Seconds the run itself spent computing target vectors (each group counted once)."""
    groups = {tuple(r["grouped_case_ids"]): r["time"]["target_seconds"] for r in case_records(summary.run_dir)}
    return sum(groups.values())


def time_table(summaries: list[RunSummary]) -> str:
    """Hours per run and, per method, in all: a run reuses the edits and target vectors that
    earlier runs saved, so a method's runs add up to what its whole series cost."""
    rows = [["method", "edits", "edit h", "of which target vectors h", "scoring h"], ["---", *["---:"] * 4]]

    def row(alg: str, edits: str, runs: list[RunSummary]) -> list[str]:
        hours = [sum(f(s) for s in runs) / 3600 for f in (lambda s: s.edit_seconds, target_seconds, lambda s: s.post_seconds)]
        return [alg, edits, *(f"{h:.2f}" for h in hours)]

    methods: dict[str, list[RunSummary]] = {}
    for s in summaries:
        methods.setdefault(s.params["config"]["alg"], []).append(s)
        rows.append(row(s.params["config"]["alg"], f"{edits_so_far(s):,}", [s]))
    rows += [row(f"**{alg}, all runs**", "", runs) for alg, runs in methods.items() if len(runs) > 1]
    return markdown_table(rows)


def cache_saving(summaries: list[RunSummary], cache: Path) -> str:
    """The cache holds every target vector of the curve, each computed once (possibly over
    several sessions: the runs' own timings miss what a killed run computed); without it every
    run computes all of its own."""
    count, seconds = cache_cost(cache)
    if not count:
        return f"no target vectors cached in {cache}"
    requested = sum(s.num_cases for s in summaries)
    per_vector = seconds / count
    return (f"target vectors: {count:,} computed once in {seconds / 3600:.1f} h ({per_vector:.2f} s each); without the cache the "
            f"{len(summaries)} runs would compute {requested:,}, about {requested * per_vector / 3600:.1f} h ({requested / count:.2f}x)")


def capacity_table(summaries: list[RunSummary]) -> str:
    """Per run: how big the update is, how much of the target change the solves could not
    write, and what the neighborhood lost (unedited minus edited success, points)."""
    rows = [["method", "edits", "‖ΔW‖/‖W‖", "target change unwritten %", "efficacy", "neighborhood loss"], ["---", *["---:"] * 5]]
    for s in summaries:
        pre, post = s.value("pre", "neighborhood_success"), s.value("post", "neighborhood_success")
        unwritten = "-" if s.update_unwritten is None else f"{100 * s.update_unwritten:.1f}"
        relative = "-" if s.update_relative is None else f"{s.update_relative:.3g}"
        loss = "-" if pre is None or post is None else f"{100 * (pre - post):.1f}"
        rows.append([s.params["config"]["alg"], f"{edits_so_far(s):,}", relative, unwritten,
                     f"{100 * s.value('post', 'efficacy_success'):.1f}", loss])
    return markdown_table(rows)


def age_table(summaries: list[RunSummary], block: int = 500) -> str:
    """Efficacy and paraphrase success of the edits of each block of ``block`` (oldest first):
    whether a sequential method loses its old edits or fails to write new ones."""
    longest = max(edits_so_far(s) for s in summaries)
    blocks = range(0, longest, block)
    head = ["method", "edits so far", *(f"edits {b + 1:,}-{b + block:,}" for b in blocks)]
    rows = [head, ["---", "---:", *["---:"] * len(blocks)]]
    for s in summaries:
        # A case's age: its place in the order its group was edited.
        aged = [(r["grouped_case_ids"].index(r["case_id"]), r["post"]) for r in case_records(s.run_dir)]
        cells = []
        for b in blocks:
            mine = [post for age, post in aged if b <= age < b + block]
            cells.append(" / ".join(f"{100 * statistics.fmean(p[k] for p in mine):.1f}" for k in ("efficacy_success", "paraphrase_success"))
                         if mine else "")
        rows.append([s.params["config"]["alg"], f"{edits_so_far(s):,}", *cells])
    return "efficacy / paraphrase success by the edits' age\n\n" + markdown_table(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--figures", type=Path, default=Path("docs/evaluation"))
    args = p.parse_args()
    for part, folder in PARTS.items():
        summaries = finished_runs(args.results / folder)
        if not summaries:
            print(f"## {part}: no finished run in {args.results / folder}\n")
            continue
        print(f"## {part}\n\n{format_comparison(summaries)}\n\n{time_table(summaries)}\n")
        if part.startswith("sequential"):
            print(age_table(summaries) + "\n")
        if part == "scaling":
            print(capacity_table(summaries) + "\n")
            print(cache_saving(summaries, args.results / folder / TARGET_CACHE) + "\n")
        png = plot_scaling(summaries, args.figures / f"{folder}.png", title=f"default model, counterfact-edit.json ({part})")
        print(f"plot: {png}\n")


if __name__ == "__main__":
    main()
