"""Checkpoints, seed plans and pipelines that draw the fixed-seed samples."""
