"""The tracker: evaluate a checkpoint (sample, embed, search, detect, store)."""
