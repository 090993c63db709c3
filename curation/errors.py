"""Errors a user can act on. The CLI prints them as one line, never as a traceback."""


class WinnowError(Exception):
    """A problem with the user's input or setup, stated in one line."""


class MissingSourceError(WinnowError):
    pass


class UnknownFormatError(WinnowError):
    pass


class NoValidPairsError(WinnowError):
    pass


class TooManyBadRowsError(WinnowError):
    pass


class SourceUnavailableError(WinnowError):
    pass
