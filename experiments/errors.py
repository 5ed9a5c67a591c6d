"""The one-line message the command-line tools print for bad data or checkpoints (exit code 2)."""


def cli_error_message(e: Exception) -> str:
    """A DataLoader worker re-raises with the worker's traceback in the message: keep its cause."""
    msg = str(e)
    if "Original Traceback" in msg:
        msg = msg.strip().splitlines()[-1].split("Error: ", 1)[-1]
    return msg
