"""Training flow: turning validated records into model-ready examples and batches (Ray Train comes next)."""
