"""Error types whose message is one clear line for the user (no traceback wall), each with the exit code the
entry points end with (BUILD.md, "When things go wrong", lists them all)."""


class FtjaxError(Exception):
    """Base class: the message says what was wrong, where, and what to do."""

    exit_code = 2  # bad input: a config, a file, a workdir another run holds


class ConfigError(FtjaxError):
    """A config key or value is invalid."""


class LoadError(FtjaxError):
    """A model, tokenizer or checkpoint could not be loaded safely."""


class DataError(FtjaxError):
    """Training or eval data is malformed (the message names file:line)."""


class StartupError(FtjaxError):
    """A multi-host run could not start (the message names the process that did not join)."""


class WriteError(FtjaxError):
    """A checkpoint or export could not be written (disk full, quota, read-only disk, permission)."""

    exit_code = 74


class PeerLost(FtjaxError):
    """A process of a multi-host run died or stopped answering; relaunching the same command resumes."""

    exit_code = 75
