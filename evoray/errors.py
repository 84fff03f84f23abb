"""User-facing errors.

Everything a user can cause (a bad path, a bad config, mismatched checkpoints) raises an
``EvorayError`` subclass whose message names the file, tensor or field and says what to do.
The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class EvorayError(Exception):
    """Base class for errors caused by input, not by evoray itself."""


class ConfigError(EvorayError):
    """A merge/search config is malformed: unknown key, missing or out-of-range parameter."""


class CheckpointError(EvorayError):
    """A checkpoint cannot be found, read or trusted (missing, corrupt, pickle refused)."""


class LayoutError(EvorayError):
    """Checkpoints do not share one layout: architecture, tensor names, shapes or dtypes differ."""


def ray_get(refs):
    """``ray.get(refs)``, but an ``EvorayError`` raised inside a Ray task comes back as itself
    (Ray wraps it in a ``RayTaskError``), so the CLI still prints one clear line."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, EvorayError):
            raise exc.cause from None
        raise
