"""Causal tracing: which layers carry a fact (to choose the layers to edit)."""
from memit.tracing.causal_trace import KINDS, Trace, noise_level, trace_prompt
from memit.tracing.run import Known, TraceConfig, average_effect, load_knowns, summarize_traces, trace_dataset

__all__ = ["KINDS", "Known", "Trace", "TraceConfig", "average_effect", "load_knowns", "noise_level", "summarize_traces", "trace_dataset", "trace_prompt"]
