"""The errors of reading and writing CRIU images."""

from __future__ import annotations

__all__ = ["ImageError", "MagicException"]


class ImageError(ValueError):
    """An image file (or an image dict) is not what CRIU writes: truncated, an absurd length, a
    message that does not parse. The message names the file or field and the offset."""


class MagicException(ImageError):
    """The file starts with a magic that names no CRIU image (``.magic``: the number read).

    The name and attribute are those of CRIU's own module, for scripts written against it."""

    def __init__(self, magic: int, where: str = "") -> None:
        self.magic = magic
        super().__init__(f"{where + ': ' if where else ''}magic 0x{magic:08x} is not a CRIU image magic "
                         "(not an image, or one of a newer CRIU)")
