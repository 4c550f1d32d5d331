"""`cnnpipe serve --help` quotes ServeOptions' defaults; the flags themselves default to unset, so the options
object is the one place the defaults live. This keeps the help text honest."""

from __future__ import annotations

import dataclasses
import re

from cnnpipe.cli import build_parser
from cnnpipe.serve.server import ServeOptions


def serve_actions():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["serve"]._actions}


def test_serve_help_quotes_the_options_defaults():
    actions = serve_actions()
    defaults = {f.name: f.default for f in dataclasses.fields(ServeOptions)}
    quoted = {name: float(re.search(r"\(default: ([0-9.]+)", actions[name].help).group(1))
              for name in ("max_batch", "max_wait_ms", "max_body_bytes", "max_images", "max_pixels", "body_timeout")}
    assert quoted == {name: float(defaults[name]) for name in quoted}
    assert all(actions[name].default is None for name in quoted)  # unset: ServeOptions decides
