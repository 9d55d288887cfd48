"""`adm <command>`: parse arguments, resolve configs, make one library call.

The only module that sees argparse. Each command is a `_cmd_<name>(args)` function registered in
`_build_parser`; library code never receives an `argparse.Namespace`.
"""

from __future__ import annotations

import argparse
import sys

from adm import __version__


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adm",
        description="Diffusion Models Beat GANs (ADM): sample, train and evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"adm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_flags_command(sub)
    return parser


def _add_flags_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flags",
        help="translate the original's flag line into adm's typed configs and print them",
        description=(
            "Paste a flag line of openai/guided-diffusion (e.g. MODEL_FLAGS + DIFFUSION_FLAGS) and "
            "see the network and diffusion configs adm resolves from it, e.g. "
            "`adm flags --image_size 256 --num_channels 256 --attention_resolutions 32,16,8`."
        ),
    )
    p.set_defaults(func=_cmd_flags, accepts_original_flags=True)


def _cmd_flags(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from adm import flags

    try:
        parsed = flags.parse_flag_line(args.original_flags)
        model_cfg, diffusion_cfg = flags.model_and_diffusion_from_flags(parsed)
    except ValueError as err:
        raise UserError(str(err)) from err
    print(
        json.dumps(
            {
                "model": {"class": type(model_cfg).__name__, **dataclasses.asdict(model_cfg)},
                "diffusion": dataclasses.asdict(diffusion_cfg),
            },
            indent=2,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    # Commands that accept the original's flag lines verbatim get the unparsed rest.
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "accepts_original_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.original_flags = rest
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"adm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
