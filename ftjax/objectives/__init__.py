"""Training objectives, one module each: what a run learns from (replies, preferences, a teacher's distribution)."""
