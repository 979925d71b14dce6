"""Real photos for demos, tests, benchmarks and parity checks: scikit-image's bundled sample images.

scikit-image is not a runtime dependency, so it is imported only when a photo is asked for; without it
:func:`test_photo` raises :class:`~flashvl_edge.runtime.errors.MissingExtraError`, a one-line error naming
the extra to install that is also an ImportError (callers with a fallback catch that).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import MissingExtraError, extra_for

if TYPE_CHECKING:
    from PIL import Image


def test_photo(name: str = "astronaut") -> Image.Image:
    """``skimage.data.<name>()`` as an RGB ``PIL.Image.Image``: "astronaut" (512x512), "coffee", "chelsea",
    "rocket", "camera", "page", "text", ... Grayscale and binary images become RGB, and RGBA ones are
    composited on white, as the runtime's image loader does."""
    import numpy as np
    from PIL import Image

    try:
        import skimage.data
    except ModuleNotFoundError as e:  # scikit-image itself, or one of its own dependencies
        missing = "skimage" if (e.name or "skimage").split(".")[0] == "skimage" else e.name
        raise MissingExtraError(missing, f"the test photo {name!r}", extra_for("skimage")) from None
    make = getattr(skimage.data, name, None) if not name.startswith("_") else None
    if not callable(make):
        raise ValueError(f"skimage.data has no image {name!r}")
    a = np.asarray(make())
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    im = Image.fromarray(a)
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, "white")
        bg.paste(im, mask=im.getchannel("A"))
        im = bg
    return im.convert("RGB")


test_photo.__test__ = False  # a helper, not a test, wherever pytest finds it imported
