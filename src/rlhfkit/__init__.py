"""rlhfkit: the whole RLHF recipe (SFT, reward model, PPO/PPO-ptx, DPO, best-of-n, online loop, evaluation).

Importing the package stays cheap: heavy modules (torch, transformers, datasets) are imported by the
submodules that need them, and optional backends (ray, vllm, deepspeed, the web stack) only on use.
"""

__version__ = "0.1.0"


class RlhfkitError(Exception):
    """An error meant for people: the CLI prints its message (no traceback) and exits non-zero."""

    exit_code = 1


class UsageError(RlhfkitError):
    """Bad command line or config: an unknown key, a value of the wrong type."""

    exit_code = 2


class DataError(RlhfkitError):
    """A missing data file or a malformed row; the message names file and line."""


class ModelError(RlhfkitError):
    """An unknown model name, or a model that cannot be loaded."""


class TemplateError(RlhfkitError):
    """A chat template whose renderings are not prefixes of each other, so loss masks cannot be exact."""


class TrainingError(RlhfkitError):
    """Training cannot go on, e.g. a non-finite loss or gradient."""
