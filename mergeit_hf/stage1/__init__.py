"""Stage 1, topic-aware filtering: embeddings, topic clusters, facility-location selection, pairs; and the prefilter."""
