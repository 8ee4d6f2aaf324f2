"""``memit tune``: edit layers from causal traces, then λ, the target-vector optimisation and
the statistics size by measured edits on held-out CounterFact requests."""
from memit.tuning.layers import candidate_windows
from memit.tuning.search import TuneConfig, TuneResult, tune

__all__ = ["TuneConfig", "TuneResult", "candidate_windows", "tune"]
