"""What the command-line tools share: the one-line message for bad data or checkpoints (exit code 2)
and the check of an input-size argument."""


def cli_error_message(e: Exception) -> str:
    """A DataLoader worker re-raises with the worker's traceback in the message: keep its cause."""
    msg = str(e)
    if "Original Traceback" in msg:
        msg = msg.strip().splitlines()[-1].split("Error: ", 1)[-1]
    return msg


def check_img_size(parser, value: int | None, flag: str) -> None:
    """``parser.error`` (exit 2) unless ``value`` is None or a positive multiple of 32 (the largest stride)."""
    if value is not None and (value <= 0 or value % 32):
        parser.error(f"{flag} must be a positive multiple of 32, got {value}")
