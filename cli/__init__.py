"""eidetic's command-line layer (installed as the ``eidetic_cli`` package).

Thin by design: parse arguments, call the ``eidetic`` library, print.
Nothing imports this package but the ``eidetic`` console script.
"""
