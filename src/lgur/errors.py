"""Errors a user can act on. The CLI prints them as one readable line instead of a traceback."""


class LgurError(Exception):
    """Base class: a problem with the user's input, files or configuration."""


class DataError(LgurError):
    """A dataset/annotation/image problem that cannot be skipped (names the file and record)."""


class ConfigError(LgurError):
    """An unknown key, a bad value or a missing file in a configuration."""


class WeightsError(LgurError):
    """A pretrained/checkpoint file that does not match the model it is loaded into."""


class SearchError(LgurError):
    """A missing/corrupt index, an index built by another model, or a search request that cannot run."""
