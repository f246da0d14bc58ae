"""What a run leaves: the final rows and their accounting, the dataset card, its figures, re-gating, publishing."""
