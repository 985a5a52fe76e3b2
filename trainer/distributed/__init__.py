"""Process groups and model wrapping; the loop calls these, callbacks never need to."""
