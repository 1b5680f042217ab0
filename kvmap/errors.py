"""User-facing errors: each carries a one-line message naming the problem and the fix."""


class KVMapError(Exception):
    """Base class of every error kvmap reports to a user; the CLI prints ``str(err)`` and exits 1."""


class InputError(KVMapError):
    """A file or argument the user gave cannot be used (missing, empty, binary, not UTF-8...)."""


class MemoryFormatError(KVMapError):
    """A memory folder is damaged, from another model, or of an unknown format version."""


class ModelLoadError(KVMapError):
    """A model could not be found or loaded."""
