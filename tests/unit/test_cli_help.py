"""`cnnpipe serve --help` quotes ServeOptions' defaults; the flags themselves default to unset, so the options
object is the one place the defaults live. This keeps the help text honest."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from cnnpipe.cli import build_parser
from cnnpipe.serve.server import ServeOptions


def serve_actions():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["serve"]._actions}


@pytest.mark.parametrize("flag, value, message", [
    ("--port", "99999", "is not a port number (0 to 65535"),
    ("--port", "-1", "is not a port number"),
    ("--body-timeout", "nan", "is not a number above 0"),
    ("--header-timeout", "0", "is not a number above 0"),
    ("--max-wait-ms", "nan", "is not a number of at least 0"),
    ("--poll", "nan", "is not a number of at least 0"),
    ("--poll", "inf", "is not a number of at least 0"),
])
def test_serve_refuses_flags_out_of_range(flag, value, message, capsys):
    """NaN passes `x <= 0` checks: as a timeout it would fail every request, as --poll poll in a busy loop; a
    port beyond 65535 would be taken modulo 65536."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", f"{flag}={value}"])
    assert exited.value.code == 2 and f"argument {flag}: '{value}' {message}" in capsys.readouterr().err


def test_serve_options_and_follow_refuse_non_finite_numbers():
    from cnnpipe.core.errors import CnnpipeError
    from cnnpipe.serve.follow import Follow

    for field in ("max_wait_ms", "body_timeout", "header_timeout"):
        with pytest.raises(CnnpipeError, match="--max-wait-ms must be a number"):
            ServeOptions(**{field: math.nan})
    with pytest.raises(CnnpipeError, match="--poll nan is out of range"):
        Follow("image-classifier#prod", poll=math.nan)


def test_serve_help_quotes_the_options_defaults():
    actions = serve_actions()
    defaults = {f.name: f.default for f in dataclasses.fields(ServeOptions)}
    quoted = {name: float(re.search(r"\(default: ([0-9.]+)", actions[name].help).group(1))
              for name in ("max_batch", "max_wait_ms", "max_body_bytes", "max_images", "max_pixels", "body_timeout")}
    assert quoted == {name: float(defaults[name]) for name in quoted}
    assert all(actions[name].default is None for name in quoted)  # unset: ServeOptions decides
