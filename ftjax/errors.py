"""Error types whose message is one clear line for the user (no traceback wall)."""


class FtjaxError(Exception):
    """Base class: the message says what was wrong, where, and what to do."""


class ConfigError(FtjaxError):
    """A config key or value is invalid."""


class LoadError(FtjaxError):
    """A model, tokenizer or checkpoint could not be loaded safely."""


class DataError(FtjaxError):
    """Training or eval data is malformed (the message names file:line)."""


class StartupError(FtjaxError):
    """A multi-host run could not start (the message names the process that did not join)."""
