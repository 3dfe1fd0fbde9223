"""params.yaml sections of the evaluation stages (eval_scores, report)."""
from __future__ import annotations

from .common import Strict


class EvalScoresParams(Strict):
    pass


class ReportParams(Strict):
    pass
