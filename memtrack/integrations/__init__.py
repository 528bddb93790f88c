"""How training reaches the tracker (see docs/integrations.md).

* :mod:`.watch` -- the sidecar: follow an output dir, stage and evaluate each ``checkpoint-N``.
* :mod:`.launch` -- ``memtrack launch``: run a training command with the sidecar or in-process.
* :mod:`.hooks` / :mod:`.inprocess` -- evaluate inside the training processes, around
  ``Accelerator.save_state``, without deadlocks (:func:`.hooks.track_accelerator` for custom scripts).
* :mod:`.logging` -- rates and match grids to accelerate's trackers, or through the sidecar's sinks
  (``tracking.loggers``): the run's tensorboard folder, and :mod:`.wandb_sink`, a wandb run of memtrack's own.
* :mod:`.cli` -- the ``watch`` and ``launch`` sub-commands.

``Tracker.step`` (custom loops) lives on :class:`memtrack.scan.tracker.Tracker`. Nothing here is imported by
the library; import the module you need.
"""
