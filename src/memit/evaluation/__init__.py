"""Evaluation of editing methods: data sets, metrics, runs, summaries and scaling curves."""
from memit.evaluation.datasets import CounterFactCase, DatasetError, ZsreCase, load_cases
from memit.evaluation.runner import RunConfig, RunHooks, run_evaluation
from memit.evaluation.summary import summarize_run

__all__ = ["CounterFactCase", "DatasetError", "RunConfig", "RunHooks", "ZsreCase", "load_cases", "run_evaluation", "summarize_run"]
