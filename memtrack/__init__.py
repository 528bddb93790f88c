"""memtrack: when does a diffusion model start to regurgitate its training images and leak identities?"""
__version__ = "0.1.0"
