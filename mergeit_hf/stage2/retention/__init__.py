"""Information retention: how much of each source survives in its merge (the measure), and the salient items
and numbers it counts."""
