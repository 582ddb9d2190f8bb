"""Datasets: benchmark loaders and scorers (POPE, CHAIR, AMBER discriminative, MME hallucination), prompt
files for batch capture, and synthetic tasks with known ground truth."""

from headlab.datasets import amber, chair, mme, pope
from headlab.datasets.prompts import PromptFile, PromptItem, read_prompts

__all__ = ["PromptFile", "PromptItem", "amber", "chair", "mme", "pope", "read_prompts"]
