"""Scores a merge is gated on: Deita's expected quality score, the scorer that asks for it, and the judge."""
