"""Tests of the data pipeline: sources, tokenization, masks, rechunk, reuse, bad input, batches."""
