"""Memorization detectors: pure functions over candidates, and their registry (DetectorSpec)."""
