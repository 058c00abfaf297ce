"""``yolo-vq`` on a device: ``edge`` runs an exported graph on cameras and files and writes records; every other
command needs the full ``yolo-vq`` package and says so in one line. Where the full package is installed, its CLI
(:mod:`yolo_vq.cli`) runs everything.

Also the parts both CLIs share, so that they behave alike: the parser with one-line errors, option types, the
``edge`` sub-command and :func:`call`, which turns every user error into one ``error:`` line and exit 2, Ctrl-C into
one line saying what was kept and exit 130, and anything else (a bug) into one line and exit 70 (``YOLO_VQ_DEBUG=1``
shows the traceback). Importing this module imports the standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from importlib.util import find_spec
from typing import Any

__all__ = ["FULL_COMMANDS", "Interrupted", "Parser", "add_edge", "call", "int_at_least", "main", "positive"]

# The sub-commands of the full package (yolo_vq.cli; a test keeps the two lists equal), with what each needs.
FULL_COMMANDS = {
    "fit": "torch and Ultralytics", "index": "torch and Ultralytics", "search": "torch, Ultralytics and FAISS",
    "upgrade": "FAISS", "info": "the index code", "export": "torch, Ultralytics and onnx",
    "ingest": "the index code", "serve": "the index code and FastAPI", "demo": "torch, Ultralytics and the demo assets",
}
EDGE_DESCRIPTION = ("yolo-vq on a device (the yolo-vq-edge install): `yolo-vq edge` runs a graph written by "
                    "`yolo-vq export` on cameras and video files with onnxruntime and writes the detections' codes "
                    "as records for `yolo-vq ingest` on a server. The other commands need the full package "
                    "(pip install yolo-vq).")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: argument --crop: ...; see `yolo-vq search --help```), exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


class Interrupted(Exception):
    """Ctrl-C, with what was kept (the message)."""


def int_at_least(text: str, least: int, expected: str, word: str | None = None) -> int | str:
    """An option's int of at least ``least`` (or the word ``word`` itself), else one argparse error naming it."""
    if word is not None and text == word:
        return text
    try:
        v = int(text)
    except ValueError:
        v = least - 1
    if v < least:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    return v


def positive(text: str) -> int:
    return int_at_least(text, 1, "a positive integer")  # type: ignore[return-value]


def cmd_edge(a) -> None:
    from .runner import EdgeModel, run

    model = EdgeModel(a.model, threads=a.threads)
    counts: dict[str, int] = {}
    try:
        run(model, a.sources, a.out, stride=a.stride, batch=a.batch, progress=not a.quiet, counts=counts)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {counts['frames']} frames, {counts['detections']} detections kept in "
                          f"{a.out} (a complete records file: `yolo-vq ingest` reads it)") from None
    per = counts["bytes"] / counts["detections"] if counts["detections"] else 0
    print(f"edge: {counts['frames']} frames, {counts['detections']} detections, {per:.0f} B of codes per detection "
          f"-> {a.out}")


def add_edge(sub: Any) -> None:
    g = sub.add_parser("edge", help="run an exported graph on video with onnxruntime only (no torch)")
    g.add_argument("model", help="the .onnx written by `yolo-vq export`")
    g.add_argument("sources", nargs="+", help="video files, image folders, webcam indices or stream URLs")
    g.add_argument("--out", required=True, help="records file to write: .jsonl or .parquet")
    g.add_argument("--stride", type=positive, default=1, help="run on every N-th frame (default 1)")
    g.add_argument("--batch", type=positive, default=4, help="frames per graph call (default 4)")
    g.add_argument("--threads", type=positive, default=None, help="onnxruntime intra-op threads")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(fn=cmd_edge)


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
    return " ".join(str(msg).split()) or type(e).__name__


def call(fn: Callable[[Any], None], a: Any) -> int:
    """Run a parsed command ``fn(a)``; returns the exit code (0, 2 user error, 130 Ctrl-C, 70 bug)."""
    from .errors import YoloVQError

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            fn(a)
    except (YoloVQError, ValueError, KeyError, OSError) as e:  # user errors: files, options, indexes, codebooks
        if isinstance(e, OSError) and e.filename is not None and e.strerror:
            msg = f"{e.filename}: {e.strerror}"
        else:
            msg = _one_line(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional package that this command needs
        print(f"error: a package this command needs is missing: {_one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line unless asked for the traceback
        if os.environ.get("YOLO_VQ_DEBUG"):
            raise
        print(f"error: internal error ({type(e).__name__}: {_one_line(e)[:300]}); this is a bug in yolo_vq: "
              f"re-run with YOLO_VQ_DEBUG=1 for the traceback and report it", file=sys.stderr)
        return 70
    return 0


def _edge_parser() -> argparse.ArgumentParser:
    p = Parser(prog="yolo-vq", description=EDGE_DESCRIPTION)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=Parser)
    add_edge(sub)
    for name, needs in FULL_COMMANDS.items():
        sub.add_parser(name, help=f"full package only (needs {needs}): pip install yolo-vq")
    return p


def main(argv: list[str] | None = None) -> int:
    """The device's ``yolo-vq`` (yolo-vq-edge's console script); the full CLI where the full package is here."""
    if find_spec("yolo_vq") is not None:
        from yolo_vq.cli import main as full

        return full(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in FULL_COMMANDS:
        print(f"error: `yolo-vq {argv[0]}` needs the full yolo-vq package ({FULL_COMMANDS[argv[0]]}); this is the "
              f"device install (yolo-vq-edge), which runs `yolo-vq edge`. Where {argv[0]} should run: "
              f"pip install yolo-vq", file=sys.stderr)
        return 2
    a = _edge_parser().parse_args(argv)
    return call(a.fn, a)


if __name__ == "__main__":
    sys.exit(main())
