"""`cnnpipe <stage>`: thin console entry points over the library; errors become one line and exit 1."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from cnnpipe.errors import CnnpipeError
from cnnpipe.params import DEFAULT_PARAMS, load_section

log = logging.getLogger("cnnpipe")


def _download(args: argparse.Namespace) -> None:
    from cnnpipe.download import download
    download(load_section("download", args.params))


def _split(args: argparse.Namespace) -> None:
    from cnnpipe.split import split
    split(load_section("split", args.params))


def _train(args: argparse.Namespace) -> None:
    from cnnpipe.train import train
    train(load_section("train", args.params))


def _evaluate(args: argparse.Namespace) -> None:
    from cnnpipe.evaluate import evaluate
    evaluate(load_section("evaluate", args.params))


def _export(args: argparse.Namespace) -> None:
    from cnnpipe.export import export
    export(load_section("export", args.params))


STAGES: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "download": (_download, "fetch the dataset's raw files and verify their checksums"),
    "split": (_split, "parse raw files into uint8 arrays and make the train/val/test split"),
    "train": (_train, "train the model on the train split, validating every epoch"),
    "evaluate": (_evaluate, "measure the model on the test split"),
    "export": (_export, "export to ONNX and check it against PyTorch with onnxruntime"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnpipe", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):  # the exporter's pass-by-pass chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except CnnpipeError as e:
        print(f"cnnpipe {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cnnpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
