"""Pictures for the Dagster UI: a matplotlib figure as a small PNG, embedded in markdown metadata.

Why this design
---------------
Dagster's UI renders `MetadataValue.md` with react-markdown and rehype-sanitize, whose schema adds the
`data:` scheme to the schemes an image source may use (dagster-io/dagster,
js_modules/dagster-ui/packages/ui-core/src/ui/MarkdownWithPlugins.tsx, since PR #13443 "Allow base64
image in Markdown"); react-markdown 8 rewrites link URLs but not image sources, and the webserver's
Content-Security-Policy sets no `img-src`. So `![alt](data:image/png;base64,...)` shows the picture in
the materialization itself, with nothing to serve, open or keep alive next to it (a file path or a
`file://` link shows nothing from a web page). Markdown over 1000 characters sits behind the UI's
"[Show Markdown]" link, which opens it in a dialog.

The PNG is stored in the event log with every materialization, so it must stay small: figures are
drawn at a low dpi and the Agg output is reduced to a palette of at most 64 colours (charts have few
colours; a palette PNG is several times smaller than an RGBA one). matplotlib figures are built as
`Figure` objects, never through `pyplot`, so no global backend or display is involved, and they are
imported inside the functions: the Dagster code location must not pay for matplotlib at load time.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PALETTE_COLOURS = 64


def figure_png(fig: Figure, colours: int = PALETTE_COLOURS) -> bytes:
    """The figure as a palette PNG of at most `colours` colours, with no text chunks."""
    from PIL import Image

    raw = io.BytesIO()
    fig.savefig(raw, format="png", metadata={"Software": None})
    raw.seek(0)
    with Image.open(raw) as image:
        small = image.convert("RGB").quantize(colors=colours)
    out = io.BytesIO()
    small.save(out, format="png", optimize=True)
    return out.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """A markdown image whose source is the PNG itself (a `data:` URI), which Dagster's UI renders."""
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    # The alt text sits between [ and ]: brackets or a newline would end the image early.
    alt = " ".join(alt.replace("[", "(").replace("]", ")").split())
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
