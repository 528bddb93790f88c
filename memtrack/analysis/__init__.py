"""Store in, summary out: onsets, trajectories, which images, the series chosen."""
