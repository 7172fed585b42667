"""Every error bnas-nni raises on purpose: one line that names the problem and the fix.

The CLI and the trainer scripts catch :class:`BNASError` and print ``error: <message>`` without a
traceback, then exit with status 2. All of them live here, so that any layer can raise or catch one
without importing the layer that usually does (the search need not import training to stop on a NaN).
"""
from __future__ import annotations


class BNASError(Exception):
    """A mistake in the user's input (a file, a name, a flag) rather than a bug in bnas-nni."""


class ConfigError(BNASError):
    """A YAML file, config key or command-line override is invalid."""


class CheckpointError(BNASError):
    """A checkpoint does not fit the network it is loaded into."""


class DatasetError(BNASError):
    """A dataset is missing or laid out differently than the loader expects."""


class ExperimentError(BNASError):
    """An NNI experiment could not start or its manager stopped (the reason comes from NNI's own log)."""


class MissingDependencyError(BNASError):
    """A program or optional library bnas-nni calls is not installed (the message says how to get it)."""


class ExtensionBuildError(BNASError):
    """A C++ extension could not be compiled or loaded (compiler, ninja or headers missing)."""


class NonFiniteError(BNASError):
    """A NaN or Inf in a loss, gradient, weight update or architecture weight: the run stops at that step."""


class RankMismatchError(BNASError):
    """The ranks of one data-parallel run disagree (architecture, weights or configuration)."""


class PeerFailureError(BNASError):
    """Another rank stopped answering (stalled past ``dist_timeout`` or died)."""
