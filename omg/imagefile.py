"""Image files with their generation parameters: PNG, JPEG and WebP, each in its own format and metadata field.

Two records go with every image:
- "parameters": AUTOMATIC1111's text (prompt, "Negative prompt: ...", "Steps: .., Sampler: .., ..."), which civitai
  and image viewers read: a PNG tEXt/iTXt chunk, or EXIF UserComment in a JPEG or WebP (as A1111 writes them);
- "omg": the whole run as JSON (omg.spec.run_record), which `omg generate --spec image.png` reads back: a second
  PNG text chunk, or an XMP packet in a JPEG or WebP.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Optional, Union
from xml.sax.saxutils import escape, unescape

from PIL import Image
from PIL.ExifTags import IFD, Base
from PIL.PngImagePlugin import PngInfo

from omg.errors import OutputError, SpecError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # extension -> Pillow format
PARAMETERS_KEY, RUN_KEY = "parameters", "omg"  # PNG text chunk names
_UNICODE = b"UNICODE\0"  # EXIF UserComment's character-code prefix; UTF-16 big-endian follows (piexif's "unicode")
_XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:omg="urn:omg:1"><omg:run>{}</omg:run></rdf:Description></rdf:RDF>'
        '</x:xmpmeta>')


def image_format(path: Union[str, os.PathLike]) -> str:
    """The Pillow format of an output path by its extension; OutputError for one omg does not write."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in FORMATS:
        raise OutputError(f"{os.fspath(path)}: cannot write images with extension {ext or '(none)'!r}; use one of "
                          f"{', '.join(sorted(FORMATS))}")
    return FORMATS[ext]


def check_output_path(path: Union[str, os.PathLike]) -> None:
    """Fail now, before any work, if `path` cannot be written: unknown extension, a folder, no writable folder."""
    path = os.fspath(path)
    image_format(path)
    if os.path.isdir(path):
        raise OutputError(f"{path}: is a folder; give an image path such as {os.path.join(path, 'omg.png')}")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):  # the folder will be made: the nearest existing one must take it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"{path}: cannot make the folder {folder}: {existing} is a file")
    if existing == folder:
        try:  # a real write: os.access says yes to root on a read-only file system
            with tempfile.TemporaryFile(dir=folder, prefix=".omg-check-"):
                pass
        except OSError as e:
            raise OutputError(f"{path}: the folder {folder} is not writable ({e.strerror or e})") from e
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot make the folder {folder} in {existing} (not writable)")


def save_image(image: Image.Image, path: str, fmt: str, parameters: Optional[str] = None,
               run: Optional[dict] = None) -> None:
    """Write `image` to `path` in `fmt` ("PNG", "JPEG", "WEBP") with the A1111 text and the run record, if given."""
    if fmt == "PNG":
        info = PngInfo()
        if parameters is not None:
            info.add_text(PARAMETERS_KEY, parameters)
        if run is not None:
            info.add_text(RUN_KEY, json.dumps(run))
        image.save(path, format="PNG", pnginfo=info)
        return
    exif = Image.Exif()
    if parameters is not None:
        exif.get_ifd(IFD.Exif)[Base.UserComment] = _UNICODE + parameters.encode("utf-16-be")
    extra: dict[str, Any] = {"exif": exif}
    if run is not None:
        extra["xmp"] = _XMP.format(escape(json.dumps(run), {'"': "&quot;"})).encode()
    # JPEG: quality 95 (lossy, as the format is); WebP: lossless, so a WebP keeps the rendered pixels
    extra.update({"quality": 95} if fmt == "JPEG" else {"lossless": True})
    image.convert("RGB").save(path, format=fmt, **extra)


def read_metadata(path: Union[str, os.PathLike]) -> tuple[Optional[str], Optional[dict]]:
    """(A1111 parameters text, run record) of an image omg wrote; None for what it lacks."""
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.format == "PNG":
                texts = getattr(im, "text", {})
                parameters, run = texts.get(PARAMETERS_KEY), texts.get(RUN_KEY)
            else:
                comment = im.getexif().get_ifd(IFD.Exif).get(Base.UserComment)
                parameters = _user_comment(comment) if comment else None
                xmp = im.info.get("xmp", b"")
                xmp = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
                found = re.search(r"<omg:run>(.*?)</omg:run>", xmp, re.S)
                run = unescape(found.group(1), {"&quot;": '"'}) if found else None
    except OSError as e:
        raise SpecError(f"{path}: cannot read the image ({e})") from e
    try:
        return parameters, None if run is None else json.loads(run)
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: the recorded run is not valid JSON ({e})") from e


def _user_comment(raw: Union[bytes, str]) -> str:
    if isinstance(raw, str):
        return raw
    code, text = raw[:8], raw[8:]
    if code == _UNICODE:
        return text.decode("utf-16-be", "replace")
    return text.decode("utf-8", "replace")
