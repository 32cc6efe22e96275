"""Evaluation on organism runs: ground-truth labels, every method scored alike, causal checks.

labels.py   relevance from held-out activations (never from rotations)
metrics.py  precision / base rate / enrichment / AP / precision@k of one method
rankings.py the methods compared (stage-wise variants, single trajectories, S->F)
causal.py   the exact splice (SAE, crosscoder or diff-SAE), adaptive clamp sweeps per ranking + controls, steering,
            own-model generations (eval.prompts_file)
run.py      evaluate_run: all of it -> RUN/eval/metrics.json
"""

from stagediff.evaluate.run import evaluate_run

__all__ = ["evaluate_run"]
