"""Spoken-LM evaluation: benchmark folders, per-item scoring under two protocols, results files (`docs/evaluation.md`)."""
