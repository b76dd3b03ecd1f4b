"""xdrive: a named, portable drive for AWS spot instances."""

__version__ = "0.1.0"
