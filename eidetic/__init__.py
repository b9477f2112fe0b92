"""eidetic: a content-addressed, immutable archive store for research data.

The library knows nothing of the command line (see cli/, package eidetic_cli).
"""

__version__ = "0.2.0"
