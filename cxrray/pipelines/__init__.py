"""Batch jobs over shards (Ray Data actor pools): encode, probe, explain (counterfactuals), audit."""
