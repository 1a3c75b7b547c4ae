"""What every program does with a bad input: one line that names the problem and exit status
1, never a traceback (absl's flags, ml_collections' config overrides, argparse's options),
and the one name of each shared option."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from absl import app, flags

TRACEBACK_ENV = "SHUFFLENET_JAX_TRACEBACK"  # set to 1 for full tracebacks instead of one line


@contextlib.contextmanager
def one_line_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """The errors of `kinds` raised in the block end the program with "error: MESSAGE" on one
    line and exit status 1 (a traceback only when $SHUFFLENET_JAX_TRACEBACK is set)."""
    try:
        yield
    except kinds as e:
        if os.environ.get(TRACEBACK_ENV):
            raise
        raise SystemExit(f"error: {e}") from None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run(..., flags_parser=parse_flags)`, with a bad config
    override (a field the config does not have, a value of the wrong type) as one line."""
    with one_line_errors(ValueError, TypeError):
        try:
            rest = app.parse_flags_with_usage(argv)
            _check_config_file()
            return rest
        except (AttributeError, KeyError) as e:
            raise ValueError(
                f"the config has no field {str(e).strip(chr(34))} (overrides are "
                "--config.SECTION.FIELD=VALUE; sections: model, data, optim, train)"
            ) from e


def _check_config_file() -> None:
    """A --config path that names no file, as one line naming it (ml_collections reports it
    only when the config is first read, as "Failed loading config file config_config")."""
    if "config" not in flags.FLAGS or flags.FLAGS["config"].value is None:
        return
    path = flags.FLAGS["config"].config_filename.split(":")[0]
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")


class _Renamed(argparse.Action):
    """Stores the value; an option string other than the first gets a deprecation line."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string is not None and option_string != self.option_strings[0]:
            print(
                f"warning: {option_string} is deprecated and will be removed; "
                f"use {self.option_strings[0]}",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)


def add_torch_weights(parser: argparse._ActionsContainer, *old_names: str, help: str) -> None:
    """The one option for a torchvision .pth file in every program, `--torch_weights`, with
    `old_names` it had in one program kept for a release as deprecated aliases."""
    parser.add_argument(
        "--torch_weights",
        *old_names,
        dest="torch_weights",
        metavar="PTH",
        action=_Renamed,
        help=help,
    )
