"""Embeddings, below the stages that use them: the sentence-transformers embedder (stage 1, and retention on
request), the static model distilled from it (retention), the batcher that embeds concurrent merges' texts
together, and the Arrow readers that scan an embedding column."""
