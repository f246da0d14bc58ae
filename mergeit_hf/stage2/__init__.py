"""Stage 2, LLM merging: the merger and its session, quality scores, retention, the gate and the merge results."""
