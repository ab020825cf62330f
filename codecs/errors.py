"""The one exception codecs raise for bad input or bad configuration."""


class CodecError(ValueError):
    """Malformed, truncated, oversized or inconsistent input, or an invalid codec config.

    The message names the problem; receivers map it to INVALID_ARGUMENT on the wire.
    """
