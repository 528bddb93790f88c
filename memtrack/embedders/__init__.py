"""Embedders: pixel, CLIP, SSCD, face identity; the registry is :mod:`.registry`."""
