"""evoray: merge and fuse language models by distributed population search on Ray."""

from evoray.errors import CheckpointError, ConfigError, EvorayError, LayoutError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "EvorayError", "LayoutError", "__version__"]
