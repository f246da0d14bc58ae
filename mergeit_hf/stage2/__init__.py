"""Stage 2, LLM merging: ``merge/`` (the merger, its session, one pair, the request, the answer, results and
columns), ``scoring/`` (Deita's expected score, the scorer, the judge), ``retention/`` (the measure and its
salient items), ``gate`` (the whole acceptance decision); and what runs the scorer before merging: the
``scorer_check`` and the optional ``prefilter``."""
