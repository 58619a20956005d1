"""kiln's error types. Errors a user can cause derive from ``KilnError``; the CLI prints their
message without a traceback and exits non-zero. Anything else reaching the CLI is a kiln bug."""


class KilnError(Exception):
    """An error the user can cause and fix; the message says what was wrong and what to do."""


class CheckpointError(KilnError):
    """A model directory is missing files, has unreadable or inconsistent weights."""


class UnsupportedModelError(KilnError):
    """The model's architecture or one of its features is not supported."""


class PassError(KilnError):
    """A compiler pass met IR it does not accept (named with the pattern that did not match)."""


class ArtifactError(KilnError):
    """An artifact is missing, tampered with, or built by another kiln/TVM version."""


class TargetError(KilnError):
    """An unknown target or arch, or a toolchain (nvcc) the target needs is missing."""


class RequestError(KilnError):
    """A generation request has out-of-range values."""


class CompilerError(KilnError):
    """A compile step failed inside TVM or in kiln's passes on a model kiln accepted: a kiln bug, reported as
    one line naming the step and the model (the full traceback goes to a log file the message names)."""
