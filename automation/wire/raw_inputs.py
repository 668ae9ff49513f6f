"""Raw inputs of image and text models, as clients send them, checked before any model runs.

- Images: uint8 pixels shaped like the version's examples (numbers 0..255), or PNG/JPEG files: base64 in
  JSON as `{"b64": "…"}` on /predict, or elements of a BYTES tensor on /v2. A file must decode to exactly the
  version's size (it is never resized: a resized image is not what the model was tested on).
- Text: UTF-8 strings, one per example; an empty text or one over MAX_TEXT_BYTES is refused.

Each refusal is a BadInput: one line naming the example and what is wrong, answered 4xx.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from typing import Any

import numpy as np

from automation.wire.json_inputs import BadInput, describe_value

MAX_TEXT_BYTES = 64 * 1024         # per example: a long news article is ~10 KB
MAX_IMAGE_BYTES = 1024 * 1024      # per encoded file, at most; smaller for small images (image_file_limit)
MAX_IMAGE_BODY = 32 * 1024 * 1024  # an image request's body, whatever its batch
MAX_TEXT_BATCH = 256               # examples per request for text
MAX_TEXT_BODY = 16 * 1024 * 1024   # a text request's body, whatever its batch


def texts(values: list[Any]) -> np.ndarray:
    """JSON strings → a 1-D object array of them."""
    if len(values) > MAX_TEXT_BATCH:
        raise BadInput(f"batch of {len(values)} texts is over the limit of {MAX_TEXT_BATCH}", 413)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise BadInput(f"example {i} is {describe_value(value) or 'a number'}: send the text as a string")
    return checked_texts(values)


def checked_texts(values: list[str]) -> np.ndarray:
    for i, text in enumerate(values):
        if not text.strip():
            raise BadInput(f"example {i} is empty: send the text to classify")
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_TEXT_BYTES:
            raise BadInput(f"example {i} is {size:,} bytes of text, over the limit of {MAX_TEXT_BYTES:,}", 413)
    return np.array(values, dtype=object)


def texts_from_bytes(elements: list[bytes]) -> np.ndarray:
    """A BYTES tensor's elements as UTF-8 text; anything else is refused by position."""
    decoded = []
    for i, element in enumerate(elements):
        try:
            decoded.append(element.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise BadInput(f"element {i} is not UTF-8 text (byte {exc.start})") from None
    return checked_texts(decoded)


def image_file_limit(shape: tuple[int, ...]) -> int:
    """The largest file taken for images shaped `shape`: 8 bytes a pixel (an uncompressed RGBA PNG is 4),
    at least 64 KiB, at most MAX_IMAGE_BYTES."""
    return min(MAX_IMAGE_BYTES, max(64 * 1024, 8 * int(np.prod(shape))))


def image_from_file(i: int, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """One PNG/JPEG file → uint8 pixels shaped `shape`. The size is checked from the header, before decoding,
    so a decompression bomb is never decoded."""
    from PIL import Image, UnidentifiedImageError

    from automation.contract import image_pixels

    limit = image_file_limit(shape)
    if len(data) > limit:
        raise BadInput(f"example {i}: an image file of {len(data):,} bytes is over the limit of {limit:,}", 413)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ("PNG", "JPEG"):
                raise BadInput(f"example {i} is a {image.format} file: send PNG or JPEG")
            if image.size == (shape[-1], shape[-2]):   # only the model's size is decoded: a small file may
                image.load()                            # declare a huge image; a broken one fails here
            return image_pixels(image, shape)
    except BadInput:
        raise
    # before ValueError: PIL says a broken PNG (a short IDAT, then data read as a chunk) with SyntaxError,
    # a short file with OSError or EOFError, a bad chunk length with struct.error
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError):
        raise BadInput(f"example {i} is not a readable PNG or JPEG file") from None
    except ValueError as exc:   # the wrong size or channels, from image_pixels
        raise BadInput(f"example {i}: {exc}") from None


def images_from_files(elements: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    return np.stack([image_from_file(i, data, shape) for i, data in enumerate(elements)])


def _b64(i: int, example: Any) -> bytes:
    if not isinstance(example, dict) or set(example) != {"b64"} or not isinstance(example["b64"], str):
        raise BadInput(f'example {i}: send every image as {{"b64": "<base64 PNG>"}}, or every one as pixels')
    try:
        return base64.b64decode(example["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"example {i}: b64 is not valid base64") from None


def images(inputs: list[Any], shape: tuple[int, ...]) -> np.ndarray | None:
    """Image files sent as `{"b64": …}` objects → uint8 pixels; None when the examples are not objects (they
    are then pixels, checked as numbers like any tensor)."""
    if not isinstance(inputs[0], dict):
        return None
    return images_from_files([_b64(i, example) for i, example in enumerate(inputs)], shape)


def bytes_elements(tensor: dict[str, Any], binary: bytes, count: int) -> list[bytes]:
    """A BYTES tensor's `count` elements: JSON strings in "data", or binary (4-byte little-endian length, then
    the bytes, per element)."""
    parameters = tensor.get("parameters") if isinstance(tensor.get("parameters"), dict) else {}
    size = parameters.get("binary_data_size")
    if size is None:
        data = tensor.get("data")
        if not isinstance(data, list) or len(data) != count:
            raise BadInput(f'a BYTES tensor shaped [{count}] needs "data": a list of {count} strings', 400)
        bad = next((i for i, v in enumerate(data) if not isinstance(v, str)), None)
        if bad is not None:
            raise BadInput(f"element {bad} of the input is {describe_value(data[bad]) or 'a number'}: send a string")
        return [v.encode("utf-8", "surrogatepass") for v in data]
    if type(size) is not int or size != len(binary):
        raise BadInput(f"binary_data_size {size!r}, but {len(binary)} bytes follow the JSON", 400)
    elements, offset = [], 0
    view = memoryview(binary)
    while offset < len(binary) and len(elements) < count:
        if offset + 4 > len(binary):
            raise BadInput(f"element {len(elements)}: its 4-byte length is cut off", 400)
        length = int.from_bytes(view[offset:offset + 4], "little")
        offset += 4
        if offset + length > len(binary):
            raise BadInput(f"element {len(elements)} claims {length} bytes, {len(binary) - offset} remain", 400)
        elements.append(bytes(view[offset:offset + length]))
        offset += length
    if len(elements) != count or offset != len(binary):
        raise BadInput(f"the binary data holds {len(elements)} elements (or trailing bytes); the shape says {count}",
                       400)
    return elements
