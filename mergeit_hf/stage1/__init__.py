"""Stage 1, topic-aware filtering: topic clusters over the embeddings (``mergeit_hf.embeddings``),
facility-location selection inside each topic, and the pairs stage 2 merges."""
