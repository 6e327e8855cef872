"""Privacy auditing in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023, arXiv 2305.08846).

A certified epsilon is an upper bound that holds only if the implementation is right. An audit trains once
with ``m`` canaries (each included with probability 1/2), guesses which were included from the trained
model, and turns the number of correct guesses into a statistical LOWER bound on epsilon. A lower bound above
the certified epsilon proves a bug (clipping, noise, sampling, reduction or accounting).

* :func:`run_audit` — one audited run with ``DPTrainer`` (``hf-ewtune audit`` on the command line);
* :mod:`~hf_ewtune.audit.canaries` — gradient canaries (white-box) and input canaries (black-box);
* :func:`audit_scores` — guesses from scores, best bound over a small grid of rules (Bonferroni);
* :func:`epsilon_lower_bound` / :func:`p_value` — the paper's theorem for (eps, delta)-DP;
* :class:`AuditReport` — certified vs audited epsilon; ``violation`` when the lower bound exceeds it;
* :mod:`~hf_ewtune.audit.processes` — multi-process runs: one canary draw, every replica's scores audited.

Example:
    >>> from hf_ewtune.audit import epsilon_lower_bound
    >>> epsilon_lower_bound(num_canaries=1000, num_guesses=200, num_correct=100, delta=1e-5)  # chance level
    0.0
"""

from hf_ewtune.audit.bound import epsilon_lower_bound, p_value
from hf_ewtune.audit.guesses import GuessResult, audit_scores
from hf_ewtune.audit.report import AuditReport
from hf_ewtune.audit.run import PrivacyViolationWarning, run_audit

__all__ = ["AuditReport", "GuessResult", "PrivacyViolationWarning", "audit_scores", "epsilon_lower_bound",
           "p_value", "run_audit"]
