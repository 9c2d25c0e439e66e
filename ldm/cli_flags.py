"""Command-line conventions of ``main.py`` and ``scripts/*.py``: ``--help`` shows every option's default, and a
long option is accepted with underscores or dashes (``--max_steps`` and ``--max-steps``).

Imports nothing but the standard library, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

SPELLING_NOTE = "Long options may be written with '_' or '-' (e.g. --max_steps or --max-steps)."


def _show_default(action: argparse.Action) -> None:
    """Append ``(default: ...)`` to an option's help unless the default is None/False or already shown; an on/off
    flag (``store_true``/``store_false``) says what it does when given, so its default is not shown (``--no-ema
    ... (default: True)`` would read as "no EMA by default")."""
    if not action.option_strings or action.help == argparse.SUPPRESS:
        return
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS or default in ([], (), ""):
        return
    if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return
    if action.help and "%(default)" in action.help:
        return
    action.help = f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that shows defaults in ``--help``, keeps the description's line breaks, and
    maps ``--a-b`` to ``--a_b`` (and back) when only the other spelling is defined.

    Args: those of ``argparse.ArgumentParser`` (``formatter_class`` defaults to keeping the description's layout).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        epilog = kwargs.get("epilog")
        kwargs["epilog"] = f"{epilog}\n\n{SPELLING_NOTE}" if epilog else SPELLING_NOTE
        super().__init__(*args, **kwargs)

    def normalize_flags(self, argv: Sequence[str]) -> list[str]:
        """``argv`` with each unknown ``--a-b``/``--a_b`` replaced by the spelling this parser defines."""
        known = {opt for action in self._actions for opt in action.option_strings if opt.startswith("--")}
        out: list[str] = []
        for i, token in enumerate(argv):
            if token == "--":
                out.extend(argv[i:])
                break
            if token.startswith("--") and len(token) > 2:
                flag, eq, value = token.partition("=")
                if flag not in known:
                    for alt in ("--" + flag[2:].replace("-", "_"), "--" + flag[2:].replace("_", "-")):
                        if alt in known:
                            flag = alt
                            break
                token = flag + eq + value
            out.append(token)
        return out

    def parse_known_args(self, args: Optional[Sequence[str]] = None,
                         namespace: Optional[argparse.Namespace] = None):  # noqa: ANN201 (argparse's signature)
        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self.normalize_flags(argv), namespace)

    def format_help(self) -> str:
        for action in self._actions:
            _show_default(action)
        return super().format_help()


THREADS_HELP = ("torch CPU threads: 'auto' uses the cores other processes leave free, re-decided as load comes and "
                "goes (OMP_NUM_THREADS, when set, wins); N fixes the count. See README, 'CPU threads'")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads auto|N`` (applied with ``ldm.threads.configure_threads``)."""
    parser.add_argument("--threads", default="auto", metavar="auto|N", help=THREADS_HELP)
