"""CLI batch reports (HTML + JSON + Markdown) on hallucination benchmarks, built from a Store."""
