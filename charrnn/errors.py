"""Exception types that the CLI turns into one `charrnn: error:` line."""


class CharrnnError(Exception):
    """A problem the user can fix (bad input, bad flag, missing file); never a bug."""


class CheckpointError(CharrnnError):
    """A checkpoint could not be read or does not fit: names the file and the field."""
