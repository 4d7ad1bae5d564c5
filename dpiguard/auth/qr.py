"""QR codes of otpauth:// provisioning URIs, for enrolling an authenticator app.

``qr_terminal`` draws the code with Unicode half blocks (two module rows per text line);
``qr_png`` writes a PNG with the pure-Python pyPNG backend of ``qrcode`` (no Pillow needed).
"""

from __future__ import annotations

import os

import qrcode
from qrcode.constants import ERROR_CORRECT_M
from qrcode.image.pure import PyPNGImage

QUIET_ZONE = 4  # modules of light border, as the QR specification requires

# (top module dark, bottom module dark) → character, for a terminal drawing light text on a dark
# background: the *light* modules are drawn with the glyph, the dark ones are left blank.
_DARK_BACKGROUND = {(False, False): "█", (False, True): "▀", (True, False): "▄", (True, True): " "}
# The same for a terminal drawing dark text on a light background.
_LIGHT_BACKGROUND = {(True, True): "█", (True, False): "▀", (False, True): "▄", (False, False): " "}


def _matrix(uri: str) -> list[list[bool]]:
    code = qrcode.QRCode(error_correction=ERROR_CORRECT_M, border=QUIET_ZONE)
    code.add_data(uri)
    code.make(fit=True)
    return code.get_matrix()


def qr_terminal(uri: str, dark_background: bool = True) -> str:
    """The QR code of ``uri`` as text lines of half blocks, quiet zone included."""
    glyphs = _DARK_BACKGROUND if dark_background else _LIGHT_BACKGROUND
    matrix = _matrix(uri)
    if len(matrix) % 2:
        matrix.append([False] * len(matrix[0]))  # pad with a light row to pair the rows
    lines = []
    for top, bottom in zip(matrix[0::2], matrix[1::2]):
        lines.append("".join(glyphs[(t, b)] for t, b in zip(top, bottom)))
    return "\n".join(lines) + "\n"


def qr_png(uri: str, path: str | os.PathLike, box_size: int = 8) -> None:
    """Write the QR code of ``uri`` as a PNG file."""
    image = qrcode.make(
        uri,
        image_factory=PyPNGImage,
        error_correction=ERROR_CORRECT_M,
        box_size=box_size,
        border=QUIET_ZONE,
    )
    with open(path, "wb") as f:
        image.save(f)


def qr_png_bytes(uri: str, box_size: int = 6) -> bytes:
    """The QR code of ``uri`` as PNG bytes (the console shows it as a data: image)."""
    import io

    image = qrcode.make(uri, image_factory=PyPNGImage, error_correction=ERROR_CORRECT_M, box_size=box_size,
                        border=QUIET_ZONE)
    buf = io.BytesIO()
    image.save(buf)
    return buf.getvalue()
