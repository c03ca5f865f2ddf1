"""Rebuild `offline.html`: DVC's plots page with vega, vega-lite and vega-embed inlined (no CDN).

    python .dvc/plots/build_offline.py            # needs `npm` and the npm registry; ~10 s

`dvc plots show` fills an HTML template: dvc-render replaces `{plot_divs}` with the plots and `{scripts}`
with `<script src="https://cdn.jsdelivr.net/...">` tags. This template has no `{scripts}` placeholder, so
those CDN tags are dropped, and the three libraries are inlined instead. The versions are the newest of
the major versions dvc-render 1.0 loads (vega 5, vega-lite 5, vega-embed 6). Licences: LICENSES/.
"""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = {  # npm package -> its minified UMD build inside the tarball
    "vega@5.33.1": "package/build/vega.min.js",
    "vega-lite@5.23.0": "package/build/vega-lite.min.js",
    "vega-embed@6.29.0": "package/build/vega-embed.min.js",
}

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot (offline)</title>
    <!-- vega, vega-lite and vega-embed inlined: this page loads nothing from the network.
         Built by .dvc/plots/build_offline.py; licences in .dvc/plots/LICENSES/. -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def _script(package: str, code: str) -> str:
    # Drop the source-map comment (a devtools fetch of a file we do not ship) and make sure the code
    # cannot close the <script> element early.
    lines = [line for line in code.splitlines() if not line.startswith("//# sourceMappingURL=")]
    body = "\n".join(lines).replace("</script", "<\\/script")
    return f'    <script type="text/javascript">/* {package} */\n{body}\n    </script>'


def build() -> str:
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        for package, member in PACKAGES.items():
            name = subprocess.run(
                ["npm", "pack", package, "--silent"], cwd=tmp, check=True, capture_output=True, text=True
            ).stdout.split()[-1]
            with tarfile.open(Path(tmp) / name) as tar:
                code = tar.extractfile(member).read().decode("utf-8")
            scripts.append(_script(package, code))
    page = PAGE.format(scripts="\n".join(scripts))
    for placeholder in ("{scripts}",):  # dvc-render would put the CDN tags back here
        assert placeholder not in page, placeholder
    return page


if __name__ == "__main__":
    (HERE / "offline.html").write_text(build(), encoding="utf-8")
