"""Paired spoken-LM benchmarks converted from their released layouts into the on-disk layout the readers use."""
