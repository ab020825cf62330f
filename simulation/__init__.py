"""A whole federation in one process: the production aggregator and collaborator code, no transport.

`run_plan(plan)` drives a real `Federation` (its round loop in a thread) and one simulated
collaborator per `collaborators.min`, each doing exactly what a `collaborator join` process does
with a task (`collaborator/round_step.py`), and returns the run report. Used by `fedsqueeze demo`
for its uncompressed baseline, by the benchmarks, and by tests as the uninterrupted reference.
"""

from .inprocess import InProcessFederation, SimResult, run_plan, uncompressed

__all__ = ["InProcessFederation", "SimResult", "run_plan", "uncompressed"]
