"""memtrack: when does a diffusion model start to regurgitate its training images and leak identities?

The main entry points are imported lazily (``import memtrack`` stays cheap):

    >>> import memtrack
    >>> tracker = memtrack.Tracker.from_config("configs/unconditional.yaml", index="ref/", run_dir="runs/ddpm")
"""
__version__ = "0.1.0"

_LAZY = {"Tracker": "memtrack.scan.tracker", "ReferenceIndex": "memtrack.index.reference", "RunStore": "memtrack.store.run_store",
         "load_config": "memtrack.config", "Config": "memtrack.config", "discover": "memtrack.sampling.checkpoints",
         "read_dataset": "memtrack.data.dataset", "get_embedder": "memtrack.embedders.registry",
         "register_embedder": "memtrack.embedders.registry", "register_detector": "memtrack.detectors.registry",
         "write_report": "memtrack.report.write",
         "register_pipeline_builder": "memtrack.sampling.registry", "get_pipeline_builder": "memtrack.sampling.registry", "MemtrackError": "memtrack.errors"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memtrack' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
