"""Spoken-LM benchmark sets built from their released layouts, and paired comparisons of their results."""
