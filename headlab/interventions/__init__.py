"""Interventions (VHR, VAR, ACT, PINE, head ablation): frozen dataclasses compiled to per-layer attention
patches that the headlab attention function applies; each with an explicit-pattern reference."""
