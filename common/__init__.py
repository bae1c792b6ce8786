"""Shared plumbing for the algorithm scripts: environments, datasets, evaluation. No algorithm logic."""
