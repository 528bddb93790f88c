"""The offline CPU demo: train a tiny DDPM on real images and track it."""
