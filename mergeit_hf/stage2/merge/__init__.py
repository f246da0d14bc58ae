"""The merge: the ``Merger`` (``Dataset.map`` callable) and its session, one pair's path through scores,
retention, judge and gate, the request it sends, the answer it parses, its results and columns."""
