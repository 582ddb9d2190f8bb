"""Analyses: the published head analyses, as functions returning tidy tables keyed by (tower, layer, head).

Contract for every module here:
- Statistics-only analyses (sinks, position bias, VHD) are pure functions of a `Store` or a `Record`
  (what the probe captured); analyses that must run the model (head importance, patching, SAE circuits)
  take the `LoadedModel` and the examples (headlab.datasets.synthetic) explicitly.
- Each returns a pandas DataFrame with at least the columns `layer`, `head` (and `tower` where more than
  one tower can appear) plus its score columns; dataclasses may wrap a frame plus summary numbers.
- Each module exposes `ANALYSES: dict[str, Analysis]`: the entries `headlab analyze NAME STORE` runs; an
  entry's `run(store, options)` computes the frame (loading the store's model with `store_model(store)`
  when it needs one) and the runner saves it back with `store.save_result(name, frame, options)`, where
  the dashboard and the reports read it.
"""

from headlab.analyses.registry import ANALYSES, Analysis, Option, StoreValues, run_analysis, store_model

__all__ = ["ANALYSES", "Analysis", "Option", "StoreValues", "run_analysis", "store_model"]
