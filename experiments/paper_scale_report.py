"""The paper-scale tables and plots from the run folders of ``experiments/paper_scale.sh``: per part
(scaling, sequential) the comparison table, the hours each run took and its plot; for the
scaling curve, the update's size, what the solves left unwritten and what the target-vector
cache saved; for the sequential runs, success by the edits' age; the ablation of the sequential
preset at 2,000 edits.

Each finished run's summary is kept in ``--archive`` (committed with the docs), so the tables and
plots still hold the runs whose folders are not under ``--results``; a run folder that is
there replaces its archived summary.

    python experiments/paper_scale_report.py [--results results] [--figures docs/evaluation] [--archive docs/evaluation/paper_runs.json]
        [--ablation-archive docs/evaluation/ablation_2000.json]
"""
from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

from memit.editing.target_cache import cache_cost
from memit.evaluation.scaling import edits_so_far, plot_scaling
from memit.evaluation.summary import RunSummary, format_comparison, load_case_records, markdown_table, summarize_run
from memit.utils.io import read_json, write_json

PARTS = {"scaling": "paper_scaling", "sequential": "paper_sequential", "sequential, AlphaEdit ridge 10": "alphaedit_probe",
         "sequential, ROME with bfloat16 target vectors": "rome_bf16",
         # rome-bf16's edit chain scores its last checkpoint itself, teacher-forced only
         "sequential, ROME's bfloat16 edit chain": "rome_chain",
         "lifelong, MEMIT's sequential preset": "memit_sequential",
         "lifelong, MEMIT's sequential preset with generated answers": "memit_sequential_answers",
         # paper_scale.sh lifelong-bf16 with VARIANT=docs/evaluation/..._edited_targets_lambda3000.json OUT=results/lifelong_edited_l3000
         "lifelong, edited-model targets, corpus weight 3,000": "lifelong_edited_l3000/teacher_forced",
         "lifelong, edited-model targets, corpus weight 3,000, generated answers": "lifelong_edited_l3000/answers",
         # the same with VARIANT=docs/evaluation/MEMIT_SmolLM2-135M-Instruct_sequential_rewrite_lapsed.json OUT=results/lapsed
         "lifelong, lapsed edits written again": "lapsed/teacher_forced",
         "lifelong, lapsed edits written again, generated answers": "lapsed/answers",
         # the same with VARIANT=docs/evaluation/MEMIT_SmolLM2-135M-Instruct_sequential_edited_targets_loss_stop.json OUT=results/lifelong_edited_loss
         "lifelong, edited-model targets, loss-based stop": "lifelong_edited_loss/teacher_forced",
         "lifelong, edited-model targets, loss-based stop, generated answers": "lifelong_edited_loss/answers",
         # paper_scale.sh lifelong-bf16 with EDITS=10000 SCORE_INTERVAL=10 OUT=results/lifelong_10k
         "lifelong, MEMIT's sequential preset, 10,000 edits, every 10th scored": "lifelong_10k/teacher_forced",
         "lifelong, MEMIT's sequential preset, 10,000 edits, every 10th scored, generated answers": "lifelong_10k/answers",
         # the same with VARIANT=docs/evaluation/MEMIT_SmolLM2-135M-Instruct_sequential_layers2-8.json OUT=results/lifelong_10k_layers2-8
         "lifelong, seven edit layers, 10,000 edits, every 10th scored": "lifelong_10k_layers2-8/teacher_forced",
         # the same with VARIANT=docs/evaluation/MEMIT_SmolLM2-135M-Instruct_sequential_preserve0.5.json OUT=results/lifelong_10k_preserve0.5
         "lifelong, preserved keys at weight 0.5, 10,000 edits, every 10th scored": "lifelong_10k_preserve0.5/teacher_forced",
         # paper_scale.sh lifelong-bf16 with MODEL=qwen2.5-coder-0.5b-instruct SCORE_INTERVAL=4 and
         # VARIANT=qwen2.5-coder-0.5b-instruct-sequential OUT=results/qwen_lifelong, or
         # VARIANT=qwen2.5-coder-0.5b-instruct OUT=results/qwen_lifelong_memit (the paper's MEMIT)
         "lifelong, Qwen2.5-Coder-0.5B, MEMIT's sequential preset, every 4th scored": "qwen_lifelong/teacher_forced",
         "lifelong, Qwen2.5-Coder-0.5B, MEMIT's sequential preset, every 4th scored, generated answers": "qwen_lifelong/answers",
         "lifelong, Qwen2.5-Coder-0.5B, the paper's MEMIT, every 4th scored": "qwen_lifelong_memit/teacher_forced",
         "lifelong, Qwen2.5-Coder-0.5B, the paper's MEMIT, every 4th scored, generated answers": "qwen_lifelong_memit/answers"}
# Figures with a line per chain of one method: file name -> (title, line label -> PARTS folder)
COMPARISONS = {"memit_sequential_10k_variants": ("SmolLM2-135M-Instruct, counterfact-edit.json, 10,000 edits in batches of 100",
                                                {"layers 4-8 (sequential preset)": "lifelong_10k/teacher_forced",
                                                 "layers 2-8": "lifelong_10k_layers2-8/teacher_forced",
                                                 "preserved keys at weight 0.5": "lifelong_10k_preserve0.5/teacher_forced"}),
               "qwen_sequential": ("qwen2.5-coder-0.5b-instruct, counterfact-edit.json, 2,000 edits in batches of 100",
                                   {"sequential preset": "qwen_lifelong/teacher_forced", "the paper's MEMIT": "qwen_lifelong_memit/teacher_forced"})}
ABLATION = "ablation"  # paper_scale.sh's ablation part: a folder per variant of the sequential preset
TARGET_CACHE = ".target_cache"  # the scaling curve's, as paper_scale.sh sets it
AGE_BLOCK = 500  # edits per block of the sequential runs' success by age (chains of up to 2,000 edits)


def planned_cases(params: dict) -> int:
    """How many cases a run set out to score: its limit, or fewer where the data file has fewer
    editable cases (recorded by runs since ``planned_cases``; counted from the file before)."""
    if "planned_cases" in params:
        return params["planned_cases"]
    config = params["config"]
    in_file = records_in(config["data_file"]) - len(params.get("skipped_case_ids", []))
    return min(config["limit"], in_file)


@functools.lru_cache
def records_in(data_file: str) -> int:
    """The data file's record count, read once for all the runs of a curve."""
    return len(read_json(data_file, what="data file"))


def finished_runs(folder: Path) -> list[RunSummary]:
    """The runs whose every case is scored."""
    summaries = []
    for params in sorted(folder.glob("*/run_*/params.json")):
        summary = summarize_run(params.parent)
        if summary.num_cases and summary.num_cases == planned_cases(summary.params):
            summaries.append(summary)
    return summaries


def time_table(summaries: list[RunSummary]) -> str:
    """Hours per run and, per method, in all: a run reuses the edits and target vectors that
    earlier runs saved, so a method's runs add up to what its whole series cost."""
    rows = [["method", "edits", "edit h", "of which target vectors h", "scoring h"], ["---", *["---:"] * 4]]

    def row(alg: str, edits: str, runs: list[RunSummary]) -> list[str]:
        hours = [sum(f(s) for s in runs) / 3600 for f in (lambda s: s.edit_seconds, lambda s: s.target_seconds, lambda s: s.post_seconds)]
        return [alg, edits, *(f"{h:.2f}" for h in hours)]

    methods: dict[str, list[RunSummary]] = {}
    for s in summaries:
        methods.setdefault(s.params["config"]["alg"], []).append(s)
        rows.append(row(s.params["config"]["alg"], f"{edits_so_far(s):,}", [s]))
    rows += [row(f"**{alg}, all runs**", "", runs) for alg, runs in methods.items() if len(runs) > 1]
    return markdown_table(rows)


def cache_saving(summaries: list[RunSummary], cost: dict[str, dict]) -> str:
    """The cache holds every target vector of the curve, each computed once (possibly over
    several runs and devices: the runs' own timings miss what a killed run computed, or
    what was computed ahead on a GPU); without it every run computes all of its own, at the
    CPU's rate where the cache has one."""
    count = sum(c["count"] for c in cost.values())
    if not count:
        return "no target vectors cached"
    requested = sum(s.num_cases for s in summaries)
    where = "; ".join(f"{c['count']:,} on {device} in {c['seconds'] / 3600:.2f} h ({c['seconds'] / c['count']:.3f} s each)"
                      for device, c in cost.items())
    line = f"target vectors: {count:,} computed once ({where}); without the cache the {len(summaries)} runs would compute {requested:,} ({requested / count:.2f}x)"
    if "cpu" in cost:
        rate = cost["cpu"]["seconds"] / cost["cpu"]["count"]
        line += f", about {requested * rate / 3600:.1f} h at the CPU's {rate:.2f} s each"
    return line


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


def age_block(longest_chain: int) -> int:
    """Edits per block of success by age: ``AGE_BLOCK``, or a quarter of a longer chain."""
    return max(AGE_BLOCK, longest_chain // 4)


def success_by_age(summary: RunSummary, size: int) -> list[list[float] | None]:
    """Mean efficacy and paraphrase success of the edits of each block of ``size``, oldest
    first: whether a sequential method loses its old edits or fails to write new ones."""
    # A case's age: its place in the order its group was edited.
    aged = [(r["grouped_case_ids"].index(r["case_id"]), r["post"]) for r in load_case_records(summary.run_dir)]
    blocks = []
    for b in range(0, edits_so_far(summary), size):
        mine = [post for age, post in aged if b <= age < b + size]
        blocks.append([statistics.fmean(p[k] for p in mine) for k in ("efficacy_success", "paraphrase_success")] if mine else None)
    return blocks


def age_table(summaries: list[RunSummary], ages: list[list[list[float] | None]]) -> str:
    longest, size = max(len(a) for a in ages), age_block(max(edits_so_far(s) for s in summaries))
    head = ["method", "edits so far", *(f"edits {b * size + 1:,}-{(b + 1) * size:,}" for b in range(longest))]
    rows = [head, ["---", "---:", *["---:"] * longest]]
    for s, blocks in zip(summaries, ages):
        cells = [" / ".join(f"{100 * v:.1f}" for v in block) if block else "" for block in blocks]
        rows.append([s.params["config"]["alg"], f"{edits_so_far(s):,}", *cells, *[""] * (longest - len(cells))])
    return "efficacy / paraphrase success by the edits' age\n\n" + markdown_table(rows)


def run_key(folder: str, summary: RunSummary) -> str:
    return f"{folder}/{summary.params['config']['alg']}/{edits_so_far(summary)}"


def update_archive(archive: dict, results: Path) -> None:
    """Puts every finished run of ``results`` into ``archive`` (replacing its earlier summary),
    and the target-vector cache's cost once the cache holds at least as many vectors."""
    for folder in PARTS.values():
        sequential = folder != PARTS["scaling"]
        runs = finished_runs(results / folder)
        size = age_block(max((edits_so_far(s) for s in runs), default=0))
        for s in runs:
            archive["runs"][run_key(folder, s)] = {"summary": s.to_record(), "by_age": success_by_age(s, size) if sequential else None}
    cost = cache_cost(results / PARTS["scaling"] / TARGET_CACHE)
    if sum(count for count, _ in cost.values()) >= sum(c["count"] for c in archive["target_cache"].values()):
        archive["target_cache"] = {device: {"count": count, "seconds": seconds} for device, (count, seconds) in cost.items()}


def update_ablation(archive: dict, results: Path) -> None:
    """Puts the summary of every finished variant in ``results/ablation`` into ``archive`` under
    the variant's name."""
    for folder in sorted((results / ABLATION).glob("*")):
        for s in finished_runs(folder):
            archive[folder.name] = {k: v for k, v in s.to_json().items() if k != "run_dir"}


def ablation_table(archive: dict) -> str:
    rows = [["variant", "edits", "efficacy", "paraphrase", "neighborhood", "Score", "‖ΔW‖/‖W‖"], ["---", *["---:"] * 6]]
    for name, record in archive.items():
        metrics = [f"{100 * record[k]['post']:.1f}" for k in ("efficacy_success", "paraphrase_success", "neighborhood_success", "score")]
        edits = record["num_edits"] * record["sequential_batches"]
        rows.append([name, f"{edits:,}", *metrics, f"{record['update_relative']:.2f}"])
    return markdown_table(rows)


def _model_name(summary: RunSummary) -> str:
    model = summary.params["config"]["model"]
    return "default model" if model == "default" else model


def archived_runs(archive: dict, folder: str) -> list[tuple[RunSummary, list | None]]:
    """The folder's archived runs (summary, success by age), by method then number of edits."""
    runs = [(RunSummary.from_record(run["summary"]), run["by_age"]) for key, run in archive["runs"].items() if key.startswith(f"{folder}/")]
    return sorted(runs, key=lambda run: (run[0].params["config"]["alg"], edits_so_far(run[0])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--figures", type=Path, default=Path("docs/evaluation"))
    p.add_argument("--archive", type=Path, default=Path("docs/evaluation/paper_runs.json"))
    p.add_argument("--ablation-archive", type=Path, default=Path("docs/evaluation/ablation_2000.json"))
    args = p.parse_args()
    ablation = read_json(args.ablation_archive, what="ablation archive") if args.ablation_archive.is_file() else {}
    update_ablation(ablation, args.results)
    write_json(args.ablation_archive, ablation)
    print(f"## ablation of the sequential preset\n\n{ablation_table(ablation)}\n")
    archive = read_json(args.archive, what="archive") if args.archive.is_file() else {"runs": {}, "target_cache": {}}
    update_archive(archive, args.results)
    write_json(args.archive, archive)
    for part, folder in PARTS.items():
        runs = archived_runs(archive, folder)
        if not runs:
            print(f"## {part}: no finished run in {args.results / folder} or {args.archive}\n")
            continue
        summaries = [summary for summary, _ in runs]
        print(f"## {part}\n\n{format_comparison(summaries)}\n\n{time_table(summaries)}\n")
        if part.startswith(("sequential", "lifelong")):
            print(age_table(summaries, [by_age for _, by_age in runs]) + "\n")
        if part == "scaling":
            print(capacity_table(summaries) + "\n")
            print(cache_saving(summaries, archive["target_cache"]) + "\n")
        png = plot_scaling(summaries, args.figures / f"{folder}.png", title=f"{_model_name(summaries[0])}, counterfact-edit.json ({part})")
        print(f"plot: {png}\n")
    for name, (title, lines) in COMPARISONS.items():
        runs = {label: [summary for summary, _ in archived_runs(archive, folder)] for label, folder in lines.items()}
        if all(runs.values()):
            labels = [label for label, summaries in runs.items() for _ in summaries]
            png = plot_scaling([s for summaries in runs.values() for s in summaries], args.figures / f"{name}.png", title=title, labels=labels)
            print(f"## {title}\n\nplot: {png}\n")


if __name__ == "__main__":
    main()
