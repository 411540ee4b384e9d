"""Commands of the bench group; registered on the main group by bnstrip.cli."""
from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add this module's commands to the main `bnstrip` group."""
