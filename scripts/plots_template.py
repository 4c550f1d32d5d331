"""Write the HTML template `dvc plots show` uses here (.dvc/config: plots.html_template): DVC's page with vega,
vega-lite and vega-embed inlined, so the plots render on a machine without internet.

DVC's own page loads the three libraries from a CDN. This fetches the versions DVC's renderer names from the npm
registry, checks each tarball against the registry's sha512 integrity, and inlines their minified builds.
    python scripts/plots_template.py [.dvc/offline-plots.html]      (make plots-template)
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import sys
import tarfile
import urllib.request
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
    <!-- vega, vega-lite and vega-embed inlined by scripts/plots_template.py: no network needed -->
SCRIPTS
    <style>
        body { font-family: sans-serif; margin: 1em 2em; }
        table { border-spacing: 15px; }
        img { max-width: 100%; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def pinned_versions() -> list[tuple[str, str]]:
    """(package, version) of the scripts DVC's vega renderer loads from the CDN."""
    from dvc_render.vega import VegaRenderer

    return re.findall(r"npm/([a-z-]+)@([0-9.]+)", VegaRenderer.SCRIPTS)


def minified(package: str, version: str) -> str:
    with urllib.request.urlopen(f"{REGISTRY}/{package}/{version}", timeout=60) as r:
        dist = json.load(r)["dist"]
    with urllib.request.urlopen(dist["tarball"], timeout=120) as r:
        data = r.read()
    algorithm, expected = dist["integrity"].split("-", 1)
    if base64.b64encode(hashlib.new(algorithm, data).digest()).decode() != expected:
        raise SystemExit(f"error: {package}@{version} does not match the registry's {algorithm} integrity")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.extractfile(f"package/build/{package}.min.js").read().decode()


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else ".dvc/offline-plots.html")
    scripts = []
    for package, version in pinned_versions():
        code = minified(package, version).replace("</script", "<\\/script")
        scripts.append(f"    <script>/* {package}@{version} */\n{code}\n    </script>")
    out.write_text(PAGE.replace("SCRIPTS", "\n".join(scripts)))
    print(f"{out}: {', '.join(f'{p}@{v}' for p, v in pinned_versions())} inlined, {out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
