"""The package version, for the run manifest and the package (``dice_ray.__version__``)."""

__version__ = "0.1.0"
