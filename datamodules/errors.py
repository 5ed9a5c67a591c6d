"""The one error type of the data package."""


class DatasetError(ValueError):
    """A problem with the dataset files; the message names the file and the image/annotation id."""
