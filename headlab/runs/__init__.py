"""Runs: the orchestration between the data and the user. A run drives a model over many items and records
what it did: batch capture into a store (`capture_to_store`), the answering runs of the benchmark reports
with their fingerprinted answer log (`answer_all`, `AnswerLog`), the sinks report's capture, cached parts,
the image maps' model runs, ACT's head search (`search_heads`) and PINE's evaluation (`judge_bias`).
Data parallelism (`process_group`, `World`): under torchrun each process takes its slice of the input.

Layering: runs read and write stores (`headlab.store`) and run models through `probe`, `interventions`,
`datasets` and `loading`; the store never imports runs, and runs never import analyses, reports,
dashboards or the CLI, which sit above them. Every run follows the reliability rules: one bad item is
listed alone and never stops the others, a rerun resumes without duplicates, Ctrl-C keeps what is done.

The names below are imported on first use (`headlab._lazy`), so the CLI's start-up does not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headlab._lazy import lazy_facade

_EXPORTS = {
    **dict.fromkeys(("BatchReport", "capture_to_store"), "headlab.runs.batch"),
    **dict.fromkeys(("AnswerLog", "ModelIdentity", "load_report_model"), "headlab.runs.answers"),
    **dict.fromkeys(("AnswerRun", "Split", "answer_all"), "headlab.runs.answering"),
    **dict.fromkeys(("Outcome", "reason"), "headlab.runs.outcome"),
    **dict.fromkeys(("World", "process_group"), "headlab.runs.distributed"),
    **dict.fromkeys(("PartsCache", "compute_parts"), "headlab.runs.cache"),
    **dict.fromkeys(("TASKS", "HeadSearch", "search_heads"), "headlab.runs.act_search"),
    **dict.fromkeys(("judge_bias", "multi_doc_accuracy"), "headlab.runs.pine_eval"),
}
__getattr__, __dir__ = lazy_facade(__name__, _EXPORTS)

if TYPE_CHECKING:
    from headlab.runs.act_search import TASKS, HeadSearch, search_heads
    from headlab.runs.answering import AnswerRun, Split, answer_all
    from headlab.runs.answers import AnswerLog, ModelIdentity, load_report_model
    from headlab.runs.batch import BatchReport, capture_to_store
    from headlab.runs.cache import PartsCache, compute_parts
    from headlab.runs.distributed import World, process_group
    from headlab.runs.outcome import Outcome, reason
    from headlab.runs.pine_eval import judge_bias, multi_doc_accuracy

__all__ = [
    "TASKS",
    "AnswerLog",
    "AnswerRun",
    "BatchReport",
    "HeadSearch",
    "ModelIdentity",
    "Outcome",
    "PartsCache",
    "Split",
    "World",
    "answer_all",
    "capture_to_store",
    "compute_parts",
    "judge_bias",
    "load_report_model",
    "multi_doc_accuracy",
    "process_group",
    "reason",
    "search_heads",
]
