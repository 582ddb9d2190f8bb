"""Datasets: prompt files for batch capture (benchmark loaders and scorers, synthetic tasks: their issue)."""

from headlab.datasets.prompts import PromptFile, PromptItem, read_prompts

__all__ = ["PromptFile", "PromptItem", "read_prompts"]
