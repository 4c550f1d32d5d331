"""`cnnpipe <stage>`: thin console entry points over the library; errors become one line and exit 1.

`serve` and `predict` run on the base install (onnxruntime, no torch); every other command needs the pipeline
extra, and says so in one line when it is missing."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

from cnnpipe import DEFAULT_PARAMS
from cnnpipe.core.errors import CnnpipeError

log = logging.getLogger("cnnpipe")
# Top-level modules of the pipeline extra (pyproject.toml), as imported
PIPELINE_MODULES = {"torch", "torchvision", "pandas", "yaml", "tqdm", "dvc", "prefect", "sqlalchemy", "onnx",
                    "onnxscript", "networkx", "ruamel", "gto", "optuna"}


def _whole_number(least: int):
    """An argparse type: a whole number of at least `least`, in ASCII digits."""
    def whole_number(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or int(text) < least:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least {least}")
        return int(text)
    return whole_number


_positive_int = _whole_number(1)
_non_negative_int = _whole_number(0)


def _number(text: str) -> float:
    """float(text), or NaN where it is not a number (so every range check on it fails)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _accuracies(text: str) -> list[float]:
    """Comma-separated test accuracies to time, e.g. 0.90,0.93 (one above 1 is never reached)."""
    values = [_number(t) for t in text.split(",") if t.strip()]
    if not values or not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of accuracies above 0, e.g. 0.90,0.93")
    return values


def _positive_float(text: str) -> float:
    if not 0 < (value := _number(text)) < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0")
    return value


def _non_negative_float(text: str) -> float:
    if not 0 <= (value := _number(text)) < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of at least 0")
    return value


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535; 0: any free port)")
    return int(text)


def _onnx_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file; run `dvc repro` to make it, or pass another model")
    return text


def _download(args: argparse.Namespace) -> None:
    from cnnpipe.core.params import load_section
    from cnnpipe.stages.download import download
    download(load_section("download", args.params))


def _split(args: argparse.Namespace) -> None:
    from cnnpipe.core.params import load_section
    from cnnpipe.stages.split import split
    split(load_section("split", args.params))


def _train(args: argparse.Namespace) -> None:
    from cnnpipe.core.params import load_section
    from cnnpipe.stages.train import train
    train(load_section("train", args.params))


def _evaluate(args: argparse.Namespace) -> None:
    from cnnpipe.core.params import load_section
    from cnnpipe.stages.evaluate import evaluate
    evaluate(load_section("evaluate", args.params))


def _export(args: argparse.Namespace) -> None:
    from cnnpipe.core.params import load_section
    from cnnpipe.stages.export import export
    export(load_section("export", args.params))


def _quantize(args: argparse.Namespace) -> None:
    from cnnpipe.core.params import load_section
    from cnnpipe.stages.quantize import quantize
    quantize(load_section("quantize", args.params))


def _predict(args: argparse.Namespace) -> int:
    from cnnpipe.serve.predict import main as predict_main
    return predict_main(args.model, args.paths, args.k, args.json)


def _serve(args: argparse.Namespace) -> None:
    import os

    from cnnpipe.serve.server import ServeOptions, serve
    given = {k: getattr(args, k) for k in ("max_batch", "max_wait_ms", "max_body_bytes", "max_images", "max_pixels",
                                           "body_timeout", "header_timeout", "max_inflight_bytes")
             if getattr(args, k) is not None}
    options = ServeOptions(resize=not args.no_resize, **given)  # unset flags keep ServeOptions' defaults
    follow = None
    if args.registry:  # needs the registry's tools (GTO, DVC): the pipeline extra
        from cnnpipe.serve.follow import Follow
        # stripped: a token read from a file or a Kubernetes secret often ends in a newline
        follow = Follow(args.registry, args.repo, args.poll, os.environ.get("CNNPIPE_ADMIN_TOKEN", "").strip())
    serve(args.model, args.host, args.port, options, threads=args.threads, workers=args.workers, follow=follow)


def _promote(args: argparse.Namespace) -> int:
    from cnnpipe.core.params import load_section
    from cnnpipe.mlops.promote import promote
    decision = promote(Path(args.repo), load_section("promote", Path(args.repo) / args.params), args.run_name,
                       args.dry_run, args.rev)
    print(decision.summary())
    return 0 if decision.promote or decision.unchanged else 3


def _registry(args: argparse.Namespace) -> None:
    from cnnpipe.mlops import registry
    if args.get:
        print(registry.fetch(Path(args.repo), args.get, Path(args.out)))
        return
    rows = registry.table(Path(args.repo))
    print(f"{'artifact':<24}{'version':<10}{'commit':<12}{'stages':<12}path")
    for r in rows:
        print(f"{r['artifact']:<24}{r['version']:<10}{r['commit']:<12}{r['stages'] or '-':<12}{r['path']}")
    if not rows:
        print("(no versions yet: `cnnpipe promote` registers the first)")


def _bench_serve(args: argparse.Namespace) -> None:
    from cnnpipe.bench.serve import bench_serve
    bench_serve(Path(args.onnx), Path(args.int8), Path(args.checkpoint), Path(args.prepared), Path(args.out),
                args.clients, args.seconds, args.repeats, args.runs, args.threads, args.max_wait_ms,
                heavy=not args.skip_heavy)


def _example_images(args: argparse.Namespace) -> None:
    from cnnpipe.core.demo_images import make_example_images
    print(make_example_images(args.dir, args.per_class, args.size, args.kind))


def _bench_hostile(args: argparse.Namespace) -> None:
    from cnnpipe.bench.hostile import bench_hostile
    bench_hostile(Path(args.onnx), Path(args.out), args.seconds, args.connections, args.pause,
                  body_timeout=args.body_timeout)


def _bench_swap(args: argparse.Namespace) -> None:
    from cnnpipe.bench.swap import bench_swap
    if args.promote_at >= args.seconds:
        raise CnnpipeError(f"--promote-at {args.promote_at:g} is not within the load's --seconds {args.seconds:g}; "
                           "promote before the load ends")
    bench_swap(Path(args.onnx), Path(args.int8), Path(args.out), args.seconds, args.promote_at, args.clients,
               args.poll)


def _bench_queue(args: argparse.Namespace) -> None:
    from cnnpipe.bench.experiments import bench_queue
    bench_queue(Path(args.repo), Path(args.out), args.experiments, args.epochs)


def _bench_sweep(args: argparse.Namespace) -> None:
    from cnnpipe.bench.experiments import bench_sweep
    bench_sweep(Path(args.repo), Path(args.out), args.trials, args.parallel, args.epochs, args.train_size or None,
                warmups=args.warmup_epochs)


def _bench_train(args: argparse.Namespace) -> None:
    from cnnpipe.bench.train import bench_synthetic, bench_train
    from cnnpipe.core.errors import CnnpipeError
    from cnnpipe.core.params import parse_section, read_yaml
    from cnnpipe.mlops.dvcops import parse_override

    accuracy, tta, section = None, False, {}
    if not args.no_accuracy or args.synthetic_cifar:
        raw = read_yaml(args.params)
        section = dict(raw.get("train") or {})
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise CnnpipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set epochs=4")
            section[key.removeprefix("train.")] = parse_override(value)
        accuracy = parse_section("train", section, f"{args.params} with --set")
        tta = parse_section("evaluate", raw.get("evaluate"), args.params).tta_flip
    targets = args.targets
    if args.synthetic_cifar:
        bench_synthetic(accuracy, args.synthetic_images, Path(args.out))
        return
    precisions = [x for x in args.precisions.split(",") if x]
    if args.seeds < 1:
        raise CnnpipeError(f"--seeds {args.seeds}: run at least 1 seed")
    for precision in precisions if accuracy is not None else []:  # checked as train.precision is
        parse_section("train", dict(section, precision=precision), f"{args.params} with --precisions")
    bench_train(Path(args.prepared), Path(args.out), args.steps, args.repeats, args.batch, args.device,
                None if args.no_accuracy else accuracy, tta, targets, args.seeds, precisions, args.train_size)


STAGES: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "download": (_download, "fetch the dataset's raw files and verify their checksums"),
    "split": (_split, "parse raw files into uint8 arrays and make the train/val/test split"),
    "train": (_train, "train the model on the train split, validating every epoch"),
    "evaluate": (_evaluate, "measure the model on the test split"),
    "export": (_export, "export to ONNX and check it against PyTorch with onnxruntime"),
    "quantize": (_quantize, "static int8 quantization of the ONNX model, measured beside fp32"),
}


def _sweep(args: argparse.Namespace) -> int:
    from cnnpipe.mlops import sweep
    repo = Path(args.repo)
    spec = sweep.check_budget(sweep.load_spec(args.file, repo / "params.yaml"), args.trials, args.parallel)
    if args.show:
        table = sweep.rows(sweep.load_existing(spec, args.storage or sweep.default_storage(repo, spec)))
    else:
        table = sweep.run(spec, repo, args.storage)
    print(sweep.summary(spec, table))
    return 0 if sweep.best_row(table) else 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnpipe", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
        p.set_defaults(func=func)

    p = sub.add_parser("predict", help="top-k labels for image files or directories (onnxruntime)")
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--model", default="models/model.onnx", help="ONNX model (default: %(default)s)")
    p.add_argument("-k", type=_positive_int, default=3, help="labels per image (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="JSON for machines instead of a table")
    p.set_defaults(func=_predict)

    p = sub.add_parser("serve", help="serve the ONNX model over HTTP (FastAPI + uvicorn)")
    p.add_argument("model", nargs="?", default="models/model.onnx", help="ONNX model (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-batch", type=int, help="images per onnxruntime run; 1 = no batching (default: 64)")
    p.add_argument("--max-wait-ms", type=_non_negative_float, help="how long a batch waits to fill (default: 1.0)")
    p.add_argument("--max-body-bytes", type=int, help="larger bodies get 413 (default: 8388608)")
    p.add_argument("--max-images", type=int, help="images per request (default: 64)")
    p.add_argument("--no-resize", action="store_true", help="refuse images of another size instead of resizing")
    p.add_argument("--max-pixels", type=int,
                   help="pixels an image may declare, checked before decoding; a request, 4 times that "
                        "(default: 0 = auto: 16 model-sized images, within 1 to 25 megapixels)")
    p.add_argument("--body-timeout", type=_positive_float,
                   help="seconds a request body may take, then 408 (default: 10)")
    p.add_argument("--max-inflight-bytes", type=int,
                   help="request bodies one server process holds at once, all its requests together; more get "
                        "503 with Retry-After (default: 0 = 32 times --max-body-bytes)")
    p.add_argument("--header-timeout", type=_positive_float,
                   help="seconds a request's line and headers may take (from the connection's start or the "
                        "previous response), then the connection is closed (default: 10)")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime threads per process (0 = the process's share of the cores)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes on the port, each with its own batcher and onnxruntime session")
    p.add_argument("--registry", metavar="REF",
                   help="serve a registry reference instead of a file, e.g. image-classifier#prod, and follow it: "
                        "a new version is loaded, warmed and swapped in without failing a request")
    p.add_argument("--repo", default=".", help="the registry's repository (default: %(default)s)")
    p.add_argument("--poll", type=_non_negative_float, default=10.0,
                   help="seconds between registry checks (0: only on SIGHUP or POST /admin/reload); with "
                        "CNNPIPE_ADMIN_TOKEN set, POST /admin/reload with that bearer token checks at once")
    p.set_defaults(func=_serve)

    p = sub.add_parser("promote", help="promote the run to production if it passes params.yaml's promote rules")
    p.add_argument("--repo", default=".", help="the project checkout (default: %(default)s)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--run-name", default="", help="recorded in the commit and the version tags")
    p.add_argument("--dry-run", action="store_true", help="decide and say why, change nothing")
    p.add_argument("--rev", help="promote a committed run instead of the checkout: an experiment's name or commit")
    p.set_defaults(func=_promote)

    p = sub.add_parser("registry", help="versions of the registered models and their stages")
    p.add_argument("--repo", default=".", help="the project checkout (default: %(default)s)")
    p.add_argument("--get", metavar="REF", help="fetch a model instead: NAME#STAGE or NAME@vX.Y.Z")
    p.add_argument("-o", "--out", default="model.onnx", help="where --get writes the file")
    p.set_defaults(func=_registry)

    p = sub.add_parser("sweep", help="search params.yaml keys with Optuna; every trial a DVC experiment (DVC's queue)")
    p.add_argument("file", help="the sweep: keys of params.yaml and their ranges (see sweeps/example.yaml)")
    p.add_argument("--trials", type=int, help="trial budget (default: the file's trials, else 12)")
    p.add_argument("--parallel", type=int, help="trials at once: dvc queue workers (default: the file's, else 1)")
    p.add_argument("--storage", help="the Optuna study's storage: a journal file (shared disk) or a database URL "
                                     "(default: .dvc/tmp/sweeps/<name>.journal)")
    p.add_argument("--repo", default=".", help="the project checkout (default: %(default)s)")
    p.add_argument("--show", action="store_true", help="print the trials so far; run nothing")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("example-images", help="write a tiny generated image set (coloured shapes)")
    p.add_argument("dir")
    p.add_argument("--kind", choices=["imagefolder", "csv"], default="imagefolder")
    p.add_argument("--per-class", type=int, default=12)
    p.add_argument("--size", type=int, default=24)
    p.set_defaults(func=_example_images)

    bench = sub.add_parser("bench", help="benchmarks, side by side in one run").add_subparsers(
        dest="bench", required=True)
    p = bench.add_parser("serve", help="inference latency per engine; HTTP throughput against a plain baseline")
    p.add_argument("--onnx", type=_onnx_file, default="models/model.onnx")
    p.add_argument("--int8", default="models/model.int8.onnx", help="its rows are left out where it is missing")
    p.add_argument("--checkpoint", default="models/model.pt")
    p.add_argument("--prepared", default="data/prepared")
    p.add_argument("--out", default="bench/serve.json")
    p.add_argument("--clients", type=_positive_int, default=32, help="concurrent closed-loop clients")
    p.add_argument("--seconds", type=_positive_float, default=10.0, help="load duration per run")
    p.add_argument("--repeats", type=_positive_int, default=3, help="runs per mode; medians are reported")
    p.add_argument("--runs", type=_positive_int, default=400, help="timed batch-1 calls per engine")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime threads of the served model (0 = the process's share of the cores)")
    p.add_argument("--max-wait-ms", type=float, default=1.0, help="batching window of the served model")
    p.add_argument("--skip-heavy", action="store_true", help="leave out the airnet (inference-heavy) rows")
    p.set_defaults(func=_bench_serve)

    p = bench.add_parser("hostile", help="/healthz latency while the service is under hostile traffic")
    p.add_argument("--onnx", type=_onnx_file, default="models/model.onnx")
    p.add_argument("--out", default="bench/hostile.json")
    p.add_argument("--seconds", type=_positive_float, default=20.0)
    p.add_argument("--connections", type=_positive_int, default=2, help="connections per kind of attack")
    p.add_argument("--pause", type=float, default=0.05, help="seconds each attacker waits between requests")
    p.add_argument("--body-timeout", type=float, default=10.0,
                   help="the served model's --body-timeout and --header-timeout")
    p.set_defaults(func=_bench_hostile)

    p = bench.add_parser("swap", help="requests, errors and latency while a server following prod swaps models")
    p.add_argument("--onnx", type=_onnx_file, default="models/model.onnx")
    p.add_argument("--int8", type=_onnx_file, default="models/model.int8.onnx")
    p.add_argument("--out", default="bench/swap.json")
    p.add_argument("--seconds", type=_positive_float, default=15.0, help="load duration")
    p.add_argument("--promote-at", type=_positive_float, default=5.0, help="seconds into the load when prod moves")
    p.add_argument("--clients", type=_positive_int, default=16, help="concurrent closed-loop clients")
    p.add_argument("--poll", type=_positive_float, default=0.2, help="the server's --poll")
    p.set_defaults(func=_bench_swap)

    p = bench.add_parser("queue", help="four one-epoch experiments through dvc queue start -j 1 and -j 2")
    p.add_argument("--repo", default=".", help="the checkout whose commit is measured (in a throwaway clone)")
    p.add_argument("--out", default="bench/queue.json")
    p.add_argument("--experiments", type=_positive_int, default=4)
    p.add_argument("--epochs", type=_positive_int, default=1)
    p.set_defaults(func=_bench_queue)

    p = bench.add_parser("sweep", help="one sweep's random draws with the median pruner and without")
    p.add_argument("--repo", default=".", help="the checkout whose commit is measured (in a throwaway clone)")
    p.add_argument("--out", default="bench/sweep.json")
    p.add_argument("--trials", type=_positive_int, default=12)
    p.add_argument("--parallel", type=_positive_int, default=2)
    p.add_argument("--epochs", type=_positive_int, default=6, help="train.epochs of every trial")
    p.add_argument("--train-size", type=_non_negative_int, default=10000,
                   help="split.train_size (0 = the whole split)")
    p.add_argument("--warmup-epochs", type=_positive_int, nargs="*", default=[], metavar="N",
                   help="also sweep with a median pruner that cuts no trial in its first N epochs (one sweep per N; "
                        "the sweep-file default, a third of --epochs, is always swept)")
    p.set_defaults(func=_bench_sweep)

    p = bench.add_parser("train", help="tutorial 000's training loop vs our engine, same model and batch size")
    p.add_argument("--prepared", default="data/prepared")
    p.add_argument("--out", default="bench/train.json")
    p.add_argument("--steps", type=_non_negative_int, default=150,
                   help="timed optimizer steps per run (0: skip the throughput parts)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="interleaved runs per loop; medians are reported")
    p.add_argument("--batch", type=_positive_int, default=100, help="batch size (the tutorial's: 100)")
    p.add_argument("--device", default="auto", help="device of the throughput part")
    p.add_argument("--params", default="params.yaml", help="time to accuracy: the train config to run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="time to accuracy: override a train param (repeatable), e.g. --set epochs=4")
    p.add_argument("--targets", type=_accuracies, default="0.90,0.92,0.93,0.94",
                   help="test accuracies to time, comma-separated")
    p.add_argument("--no-accuracy", action="store_true", help="skip time to accuracy (c)")
    p.add_argument("--train-size", type=_non_negative_int, default=0,
                   help="time to accuracy on this many images of the train split (0 = all of it)")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help="time to accuracy over this many seeds (train.seed, +1, ...)")
    p.add_argument("--precisions", default="", help="time to accuracy in each of these train.precision values, "
                   "comma-separated (e.g. auto,fp32); default: the config's")
    p.add_argument("--synthetic-cifar", action="store_true",
                   help="instead: throughput of the config (with --set) on random CIFAR-shaped data (d)")
    p.add_argument("--synthetic-images", type=int, default=50_000, help="training images of (d); CIFAR-10 has 50,000")
    p.set_defaults(func=_bench_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):  # the exporter's pass-by-pass chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        status = args.func(args)
    except CnnpipeError as e:
        print(f"cnnpipe {args.command}: error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in PIPELINE_MODULES:
            raise
        print(f"cnnpipe {args.command}: error: needs the pipeline extra (no module '{e.name}'); install it with "
              "pip install 'cnnpipe[pipeline]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cnnpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
