"""The one exception type of the data package, and what PIL raises for a damaged image file."""

import difflib

from PIL import Image

# What opening and decoding a damaged image raises in PIL: OSError (truncated, unidentified),
# SyntaxError (a broken PNG chunk), ValueError (a PNG's "Truncated IHDR chunk"), a pixel bomb.
# Wrap only the open / decode in it: a ValueError from elsewhere is a bug, not a bad file.
IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataError(ValueError):
    """A data set, folder or data option is unusable; the message names the problem and what to do."""


def unknown_key_error(key, valid, where="data config", what="key") -> DataError:
    """DataError for an unknown option, naming the nearest valid one (typos are the usual cause)."""
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid {what}s: {', '.join(sorted(valid))}"
    return DataError(f"unknown {what} '{key}' in {where}; {hint}")
