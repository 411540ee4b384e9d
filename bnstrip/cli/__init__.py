"""The `bnstrip` command: a root group that imports each command's module only when that command runs.

One module per command (fuse, verify, bench) plus the homework maths commands (maths.py); shared output and
the one exception-to-exit-code mapping live in common.py.  No torch import here: `bnstrip --help` stays fast.
Shell completion comes from click: `eval "$(_BNSTRIP_COMPLETE=bash_source bnstrip)"`.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from bnstrip import __version__

COMMANDS: dict[str, str] = {
    "fuse": "bnstrip.cli.fuse:fuse",
    "verify": "bnstrip.cli.verify:verify",
    "bench": "bnstrip.cli.bench:bench",
    "init-stats": "bnstrip.cli.maths:init_stats_command",
    "conv-grad": "bnstrip.cli.maths:conv_grad_command",
    "density": "bnstrip.cli.maths:density_command",
    "kl": "bnstrip.cli.maths:kl_command",
}
"""Command name -> `module:attribute` of its click.Command; add a command by adding a line here."""


_NO_ARGS_IS_HELP: type[BaseException] | tuple[()] = getattr(click.exceptions, "NoArgsIsHelpError", ())
"""click >= 8.2 raises it for a bare `bnstrip`; 8.1 prints the help itself."""


class LazyGroup(click.Group):
    """A click.Group whose subcommands are imported on first use (click's documented lazy-loading pattern)."""

    def __init__(self, *args, lazy_subcommands: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """click's main, except that a usage error is ONE stderr line (click prints usage, a hint and the error)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # `bnstrip` alone: the help, as click shows it
            assert isinstance(exc, click.ClickException)
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            command = ctx.command_path if ctx is not None else (prog_name or "bnstrip")
            hint = f" (see `{command} --help`)" if isinstance(exc, click.UsageError) else ""
            message = " ".join(exc.format_message().split())
            click.echo(f"bnstrip: error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("bnstrip: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_subcommands:
            module_name, attr = self.lazy_subcommands[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy_subcommands[cmd_name]} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, lazy_subcommands=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="bnstrip")
def main() -> None:
    """Fold BatchNorm into the neighbouring conv/linear layers, prove the outputs match, write the checkpoint.

    \b
    bnstrip fuse smallNetSaved smallNetTest.pt     # fold, self-check, write
    bnstrip verify smallNetSaved smallNetTest.pt   # prove it on CIFAR-10's test set
    """
