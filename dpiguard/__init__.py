"""dpiguard: inline access-control proxy for hospital patient records."""
__version__ = "0.1.0"
