"""Analyses: pure functions from a Store (or a Record) to tidy results keyed by layer and head.

Contract for the modules that will live here: take stored data, never a model; return a dataclass or a
DataFrame; write results back to the store for the dashboard and reports.
"""
