"""The wire contract: every message that crosses a ZeroMQ socket, and nothing else.

A message is a multipart ZeroMQ message. Frame 0 is a UTF-8 JSON header that always carries
``"protocol": "crackscan"``, the protocol version ``"v"`` and the message ``"type"``. Pixels and
masks travel as their own frames, described in the header by ``encoding``, ``dtype`` and
``shape`` -- never inside the JSON, never pickled.

    type       frames                       sent by       to
    run_start  [header]                     acquisition   management
    frame      [header, pixels]             acquisition   one inference worker (that gave credit)
    result     [header, mask, photo...]     inference     management
    end        [header]                     acquisition   management
    credit     [header]                     inference     acquisition (frames taken, done, failed)
    heartbeat  [header]                     inference     acquisition (alive; every HEARTBEAT_S)
                                            acquisition   management (alive, naming its run)
    stored     [header]                     management    the run's acquisition (results stored)

Version 4 sends a result's mask as bits (``encoding`` ``"bits"``: one bit a pixel, row-major,
numpy's ``packbits`` order) instead of PNG: packing and unpacking cost 0.07 and 0.3 ms for a
640 x 360 mask against 0.9 and 1.6 ms for PNG on this project's 2-core machine, work that
inference and management otherwise take from the model on a small vehicle PC; 29 KB on the wire
instead of about 3 KB.

Version 3 added the optional photos of a result: a JPEG of the frame around each crack, one frame
each after the mask, described by the header's ``photos`` list.

Version 2 made dispatch acknowledged (``acquisition.dispatch``): a worker asks for frames with
``credit``, acquisition keeps each frame until management reports it ``stored``, and re-sends the
frames of a worker that died (no ``heartbeat`` for ``WORKER_TIMEOUT_S``).

Receiving is strict: frame count, protocol, version, type, field types, dtype and shape are checked
against the payload, and any violation raises :class:`WireError`, which a stage catches, counts
and survives.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import cv2
import numpy as np

from crackscan.errors import CrackscanError

PROTOCOL = "crackscan"
PROTOCOL_VERSION = 4
HEARTBEAT_S = 0.5  # a worker (and acquisition) says it is alive this often ...
WORKER_TIMEOUT_S = 5.0  # ... and a worker silent this long is dead: its frames are re-sent
MAX_FRAME_KEYS = 10_000  # frames one credit or stored message may name
ENCODINGS = ("raw", "jpeg", "png")  # a frame's pixels
MASK_ENCODING = "bits"  # a result's binary mask (0 / 255): one bit a pixel
MAX_HEADER_BYTES = 1 << 20  # a header is small; a larger one is malformed, not data
MAX_COUNT = (1 << 63) - 1  # sequence numbers and counters fit a signed 64-bit column
MAX_HEADER_DEPTH = 32  # JSON nesting: a result's polyline points are 5 deep, a run's config ~8
MAX_INT_DIGITS = 19  # every integer fits a signed 64-bit column; a longer one is refused unparsed
# pixels of one decoded image (the default budget; decode takes another): a decompression bomb (a
# small PNG declaring 8192 x 8192) is refused from its header before any pixel is decoded, and
# acquisition refuses a larger frame at the source (counted bad); 64 Mpx holds an 8000 x 8000
# line-scan frame
MAX_PIXELS = 64_000_000
PHOTO_MAX_PX = 512  # a crack photo's longer side at most (the worker writes inference.photo_max_px)
CRACK_TYPES = ("longitudinal", "circumferential", "diagonal", "network")
END_REASONS = ("end_of_source", "stopped", "source_error", "recording_error")
MODES = ("replay", "live")


class WireError(CrackscanError, ValueError):
    """A message that does not follow the wire contract."""


# --- pixel payloads ----------------------------------------------------------------------------

def encode_pixels(image: np.ndarray, encoding: str, jpeg_quality: int = 95) -> bytes:
    if encoding == MASK_ENCODING:  # nonzero pixels as 1
        return np.packbits(np.asarray(image) > 0).tobytes()
    if encoding == "raw":
        return np.ascontiguousarray(image).tobytes()
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if encoding == "jpeg" else []
    ok, buffer = cv2.imencode(".jpg" if encoding == "jpeg" else ".png", image, params)
    if not ok:
        raise WireError(f"cannot {encoding}-encode an image of shape {image.shape}")
    return buffer.tobytes()


def decode_pixels(payload: bytes, encoding: str, dtype: str, shape: list[int],
                  max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Pixels of a message as the header declares them: ``shape`` [H, W] (grey) or [H, W, 1|3]
    (a raw [H, W, 1] comes back as HxW, as a grey image is used everywhere). A compressed
    payload's own header must declare the same size, and at most ``max_pixels``, before any pixel
    is decoded. ``"bits"`` (a binary mask, [H, W] only) decodes to 0 and 255."""
    if encoding not in ENCODINGS + (MASK_ENCODING,):
        raise WireError(f"unknown pixel encoding {encoding!r}; expected one of "
                        f"{ENCODINGS + (MASK_ENCODING,)}")
    if dtype != "uint8":
        raise WireError(f"pixel dtype {dtype!r} is not supported; expected 'uint8'")
    if not (isinstance(shape, list) and len(shape) in (2, 3)
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 16
                    for n in shape)
            and (len(shape) == 2 or shape[2] in (1, 3))):
        raise WireError(f"bad pixel shape {shape!r}; expected [H, W] or [H, W, 1|3]")
    if shape[0] * shape[1] > max_pixels:
        raise WireError(f"an image of {shape[1]} x {shape[0]} pixels is over the budget of "
                        f"{max_pixels} pixels")
    if encoding == MASK_ENCODING:
        if len(shape) != 2:
            raise WireError(f"bits are a binary mask [H, W], not {shape}")
        expected = (shape[0] * shape[1] + 7) // 8
        if len(payload) != expected:
            raise WireError(f"bits hold {len(payload)} bytes, shape {shape} needs {expected}")
        bits = np.unpackbits(np.frombuffer(payload, np.uint8), count=shape[0] * shape[1])
        return (bits * np.uint8(255)).reshape(shape)
    if encoding == "raw":
        expected = math.prod(shape)
        if len(payload) != expected:
            raise WireError(f"raw pixels hold {len(payload)} bytes, shape {shape} needs {expected}")
        return np.frombuffer(payload, np.uint8).reshape(shape[:2] if shape[-1:] == [1] else shape)
    if len(shape) == 3 and shape[2] == 1:
        raise WireError(f"{encoding} pixels are grey [H, W] or colour [H, W, 3], not {shape}")
    declared = _image_size(bytes(payload[:MAX_IMAGE_HEADER_BYTES]), encoding)
    if declared != (shape[1], shape[0]):
        raise WireError(f"{encoding} pixels declare {_size(declared)}, the header says "
                        f"{shape[1]} x {shape[0]}")
    flag = cv2.IMREAD_GRAYSCALE if len(shape) == 2 else cv2.IMREAD_COLOR
    try:
        image = cv2.imdecode(np.frombuffer(payload, np.uint8), flag)
    except cv2.error:
        image = None
    if image is None:
        raise WireError(f"cannot decode {encoding} pixels ({len(payload)} bytes)")
    if list(image.shape) != shape:
        raise WireError(f"{encoding} pixels decode to {list(image.shape)}, header says {shape}")
    return image


MAX_IMAGE_HEADER_BYTES = 1 << 16  # a JPEG's size (its SOF marker) lies within its first 64 KiB
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless...): they carry the image size
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _size(size: tuple[int, int] | None) -> str:
    return "no size" if size is None else f"{size[0]} x {size[1]}"


def _image_size(head: bytes, encoding: str) -> tuple[int, int] | None:
    """(width, height) that a PNG's IHDR or a JPEG's start-of-frame declares; None when the
    bytes are not such an image (or the JPEG's frame header is not within ``head``)."""
    if encoding == "png":
        if len(head) < 24 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
            return None
        return struct.unpack(">II", head[16:24])
    if not head.startswith(b"\xff\xd8"):
        return None
    at = 2
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            at += 2
            continue
        (length,) = struct.unpack(">H", head[at + 2:at + 4])
        if marker in _JPEG_SOF:
            if at + 9 > len(head):
                return None
            height, width = struct.unpack(">HH", head[at + 5:at + 9])
            return width, height
        at += 2 + length
    return None


# --- header helpers ----------------------------------------------------------------------------

def _header_frame(kind: str, body: dict[str, Any]) -> bytes:
    return json.dumps({"protocol": PROTOCOL, "v": PROTOCOL_VERSION, "type": kind, **body},
                      separators=(",", ":"), allow_nan=False).encode()


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _nesting_depth(raw: bytes) -> int:
    """How deeply the JSON text ``raw`` nests arrays and objects (brackets in strings aside),
    counted without parsing it."""
    if not raw:
        return 0
    codes = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    step = (np.isin(codes, (0x5B, 0x7B)).astype(np.int32)  # [ {
            - np.isin(codes, (0x5D, 0x7D)))  # ] }
    return int(np.cumsum(step).max(initial=0))


def _json_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS or not -MAX_COUNT <= (value := int(text)) <= MAX_COUNT:
        raise WireError(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is out of range "
                        "(64-bit)")
    return value


def _json_constant(name: str) -> float:
    raise WireError(f"header holds {name}, which is not JSON")


def parse_header(frame: bytes) -> dict[str, Any]:
    if len(frame) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    raw = bytes(frame)
    if (depth := _nesting_depth(raw)) > MAX_HEADER_DEPTH:
        raise WireError(f"header nests {depth} deep, more than {MAX_HEADER_DEPTH}")
    try:
        header = json.loads(raw.decode("utf-8"), parse_int=_json_int,
                            parse_constant=_json_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is one
        if isinstance(exc, WireError):
            raise
        raise WireError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("protocol") != PROTOCOL:
        raise WireError("not a crackscan message (header lacks protocol 'crackscan')")
    if header.get("v") != PROTOCOL_VERSION:
        raise WireError(f"protocol version {header.get('v')!r} is not supported; "
                        f"this build speaks version {PROTOCOL_VERSION}")
    return header


_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,), dict: (dict,),
          list: (list,)}


def _take(header: dict[str, Any], name: str, kind: type, where: str | None = None) -> Any:
    """Field ``name`` of ``header`` checked to be of ``kind`` (a bool is never a number here)."""
    where = where or f"{header.get('type')} header"
    if name not in header or header[name] is None:
        raise WireError(f"{where} lacks field {name!r}")
    value = header[name]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, _TYPES[kind]):
        raise WireError(f"{where} field {name!r} should be {kind.__name__}, "
                        f"got {type(value).__name__}")
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise WireError(f"{where} field {name!r} is not finite")
    return value


def _count(header: dict[str, Any], name: str, where: str | None = None) -> int:
    """A sequence number or counter: an int in 0 .. 2**63-1."""
    value = _take(header, name, int, where)
    if not 0 <= value <= MAX_COUNT:
        raise WireError(f"{where or header.get('type')} field {name!r} = {value} is out of range")
    return value


def _choice(header: dict[str, Any], name: str, choices: tuple[str, ...],
            where: str | None = None) -> str:
    value = _take(header, name, str, where)
    if value not in choices:
        raise WireError(f"{where or header.get('type')} field {name!r} = {value!r} is not one "
                        f"of {choices}")
    return value


def _expect_frames(frames: list[bytes], count: int, kind: str) -> None:
    if len(frames) != count:
        raise WireError(f"a {kind} message has {count} frame(s), got {len(frames)}")


# --- messages ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunStartMessage:
    """A run begins: what is read, in which mode, with which cameras and configuration."""

    TYPE: ClassVar[str] = "run_start"
    run_id: str
    source: str
    mode: str
    started_at: float  # unix seconds
    cameras: tuple[str, ...] = ("cam0",)
    config: dict = field(default_factory=dict)

    def to_frames(self) -> list[bytes]:
        return [_header_frame(self.TYPE, {**asdict(self), "cameras": list(self.cameras)})]

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> RunStartMessage:
        _expect_frames(frames, 1, cls.TYPE)
        h = parse_header(frames[0])
        cameras = _take(h, "cameras", list)
        if (not cameras or not all(isinstance(c, str) for c in cameras)
                or len(set(cameras)) != len(cameras)):
            raise WireError("run_start field 'cameras' must be a non-empty list of distinct "
                            "strings")
        return cls(run_id=_take(h, "run_id", str), source=_take(h, "source", str),
                   mode=_choice(h, "mode", MODES), started_at=_take(h, "started_at", float),
                   cameras=tuple(cameras), config=_take(h, "config", dict))


@dataclass(frozen=True)
class FrameMessage:
    """One captured frame. ``image`` is HxWx3 BGR (OpenCV order) or HxW grey, uint8.
    ``chainage_m`` is the position along the tunnel of the image centre at capture time."""

    TYPE: ClassVar[str] = "frame"
    run_id: str
    camera_id: str
    seq: int
    capture_time: float  # unix seconds
    chainage_m: float
    image: np.ndarray = field(repr=False)
    encoding: str = "raw"  # how the pixels travel: raw on one host, jpeg / png across a network

    def to_frames(self) -> list[bytes]:
        if self.encoding not in ENCODINGS:
            raise WireError(f"unknown pixel encoding {self.encoding!r}")
        header = {name: getattr(self, name) for name in
                  ("run_id", "camera_id", "seq", "capture_time", "chainage_m", "encoding")}
        header.update(dtype=str(self.image.dtype), shape=list(self.image.shape))
        return [_header_frame(self.TYPE, header), encode_pixels(self.image, self.encoding)]

    @classmethod
    def from_frames(cls, frames: list[bytes], max_pixels: int = MAX_PIXELS) -> FrameMessage:
        _expect_frames(frames, 2, cls.TYPE)
        h = parse_header(frames[0])
        encoding = _choice(h, "encoding", ENCODINGS)
        image = decode_pixels(frames[1], encoding, _take(h, "dtype", str), _take(h, "shape", list),
                              max_pixels)
        return cls(run_id=_take(h, "run_id", str), camera_id=_take(h, "camera_id", str),
                   seq=_count(h, "seq"), capture_time=_take(h, "capture_time", float),
                   chainage_m=_take(h, "chainage_m", float), image=image, encoding=encoding)


def _check_record(cls: type, raw: Any, where: str) -> None:
    """A record of a result header is a JSON object with no field its dataclass lacks."""
    if not isinstance(raw, dict):
        raise WireError(f"a {where} must be a JSON object")
    unknown = set(raw) - {f.name for f in fields(cls)}
    if unknown:
        raise WireError(f"{where} has unknown fields {sorted(unknown)}")


def _bbox(raw: dict[str, Any], record: str, name: str = "bbox_px") -> tuple[int, int, int, int]:
    bbox = raw.get(name)
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) for v in bbox)):
        raise WireError(f"{record} field {name!r} must be four integers [x, y, width, height]")
    return tuple(bbox)  # type: ignore[return-value]  # four ints, checked above


@dataclass(frozen=True)
class CrackRecord:
    """One crack found in one frame, measured in pixels and in tunnel units.

    Lengths and widths in mm, chainage in m, ring position (arc) in mm. ``polyline_px`` is the
    simplified skeleton as (x, y) image points, ``polyline`` the same points as
    (chainage_m, arc_mm).
    ``orientation_deg`` is the angle of the crack's main axis, measured in mm in the
    (chainage, arc) plane from growing chainage towards growing arc, 0..180 (0 = along the tunnel).
    ``length_mm`` is the skeleton length plus half the local width at each end (thinning
    shortens a stroke by about that much); widths are perpendicular to the skeleton.
    """

    index: int
    length_px: float
    length_mm: float
    width_mean_mm: float
    width_max_mm: float
    width_p95_mm: float
    width_max_px: float
    orientation_deg: float
    type: str  # longitudinal | circumferential | diagonal | network
    severity: str
    area_px: int
    area_mm2: float
    bbox_px: tuple[int, int, int, int]  # x, y, width, height
    chainage_m: float  # of the crack's centroid
    chainage_start_m: float
    chainage_end_m: float
    arc_mm: float  # of the crack's centroid
    score_mean: float
    polyline_px: tuple[tuple[float, float], ...]
    polyline: tuple[tuple[float, float], ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bbox_px"] = list(self.bbox_px)
        out["polyline_px"] = [list(p) for p in self.polyline_px]
        out["polyline"] = [list(p) for p in self.polyline]
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> CrackRecord:
        _check_record(cls, raw, "crack record")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("index", "area_px"):
                values[f.name] = _count(raw, f.name, "crack record")
            elif f.name == "type":
                values[f.name] = _choice(raw, f.name, CRACK_TYPES, "crack record")
            elif f.name == "severity":
                values[f.name] = _take(raw, f.name, str, "crack record")
            elif f.name not in ("bbox_px", "polyline_px", "polyline"):
                values[f.name] = _take(raw, f.name, float, "crack record")
        if values["chainage_start_m"] > values["chainage_end_m"]:
            raise WireError("crack record has chainage_start_m > chainage_end_m")
        values["bbox_px"] = _bbox(raw, "crack")
        for name in ("polyline_px", "polyline"):
            points = raw.get(name)
            if not (isinstance(points, list) and all(
                    isinstance(p, list) and len(p) == 2
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                            and math.isfinite(v) for v in p) for p in points)):
                raise WireError(f"crack field {name!r} must be a list of [x, y] number pairs")
            values[name] = tuple((float(x), float(y)) for x, y in points)
        return cls(**values)


FEATURE_KIND_MAX = 32  # a lining feature's kind is a model class name, e.g. "joint"


@dataclass(frozen=True)
class FeatureRecord:
    """One lining feature found in one frame: a connected region of one class of a multi-class
    model other than background and crack (a joint, a stain, a bolt hole...), never a crack.

    ``kind`` is the model's class name. Chainage in m, ring position (arc) in mm; the extents
    are those of the region's bounding box. ``length_mm`` is the region's extent along its
    principal axis, ``orientation_deg`` that axis in the (chainage, arc) plane as for a crack
    (0 = along the tunnel, 90 = round the ring: a ring joint).
    """

    index: int
    kind: str
    area_px: int
    area_mm2: float
    bbox_px: tuple[int, int, int, int]  # x, y, width, height
    chainage_m: float  # of the region's centroid
    chainage_start_m: float
    chainage_end_m: float
    arc_mm: float  # of the region's centroid
    arc_start_mm: float
    arc_end_mm: float
    length_mm: float
    orientation_deg: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bbox_px"] = list(self.bbox_px)
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> FeatureRecord:
        where = "feature record"
        _check_record(cls, raw, where)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("index", "area_px"):
                values[f.name] = _count(raw, f.name, where)
            elif f.name == "kind":
                kind = _take(raw, f.name, str, where)
                if not (0 < len(kind) <= FEATURE_KIND_MAX and kind.isprintable()):
                    raise WireError(f"feature kind {kind[:40]!r} is not a class name of 1 to "
                                    f"{FEATURE_KIND_MAX} printable characters")
                values[f.name] = kind
            elif f.name != "bbox_px":
                values[f.name] = _take(raw, f.name, float, where)
        if values["chainage_start_m"] > values["chainage_end_m"]:
            raise WireError("feature record has chainage_start_m > chainage_end_m")
        if values["arc_start_mm"] > values["arc_end_mm"]:
            raise WireError("feature record has arc_start_mm > arc_end_mm")
        values["bbox_px"] = _bbox(raw, "feature")
        return cls(**values)


@dataclass(frozen=True)
class CrackPhoto:
    """The frame's pixels around one crack of a result, as JPEG: ``crack`` is the crack's
    ``index``, ``box_px`` ([x, y, width, height] in frame pixels) the region the photo shows,
    scaled to at most :data:`PHOTO_MAX_PX` on its longer side."""

    crack: int
    box_px: tuple[int, int, int, int]
    jpeg: bytes = field(repr=False)


def _photos(h: dict[str, Any], frames: list[bytes], cracks: tuple[CrackRecord, ...],
            shape: list[int]) -> tuple[CrackPhoto, ...]:
    """A result's photos from its header's ``photos`` list and frames 2..: each names one of
    its cracks once, shows a box inside the frame, and is a JPEG no larger than PHOTO_MAX_PX."""
    raw = _take(h, "photos", list) if "photos" in h else []
    _expect_frames(frames, 2 + len(raw), "result (with its photos)")
    indices = {crack.index for crack in cracks}
    photos: list[CrackPhoto] = []
    for item, jpeg in zip(raw, frames[2:], strict=True):
        if not (isinstance(item, dict) and set(item) == {"crack", "box_px"}):
            raise WireError("a result photo is {\"crack\": index, \"box_px\": [x, y, w, h]}")
        crack = _count(item, "crack", "result photo")
        if crack not in indices or any(p.crack == crack for p in photos):
            raise WireError(f"result photo of crack {crack}: no such crack, or a second photo")
        x, y, w, h_ = box = _bbox(item, "result photo", "box_px")
        if not (x >= 0 and y >= 0 and w > 0 and h_ > 0 and x + w <= shape[1]
                and y + h_ <= shape[0]):
            raise WireError(f"result photo box {list(box)} is not inside the frame "
                            f"({shape[1]} x {shape[0]})")
        size = _image_size(bytes(jpeg[:MAX_IMAGE_HEADER_BYTES]), "jpeg")
        if size is None or not (0 < max(size) <= PHOTO_MAX_PX):
            raise WireError(f"result photo of crack {crack} is not a JPEG of at most "
                            f"{PHOTO_MAX_PX} px a side ({_size(size)})")
        try:  # small: decoding it costs well under a millisecond, and proves it is whole
            whole = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED) is not None
        except cv2.error:
            whole = False
        if not whole:
            raise WireError(f"result photo of crack {crack} does not decode as JPEG")
        photos.append(CrackPhoto(crack=crack, box_px=box, jpeg=bytes(jpeg)))
    return tuple(photos)


@dataclass(frozen=True)
class ResultMessage:
    """What inference found in one frame: the measured cracks, the binary crack mask (HxW
    uint8, 0 or 255), sent as its own frame of bits (``MASK_ENCODING``), and the lining
    features a multi-class model found (none from a binary model; a header without
    ``features`` has none), and a photo of the frame around each crack where the worker keeps
    them (:class:`CrackPhoto`)."""

    TYPE: ClassVar[str] = "result"
    run_id: str
    camera_id: str
    seq: int
    capture_time: float
    chainage_m: float
    inference_ms: float
    model: str  # model name and short hash, e.g. "mobilenet_aspp@3f2a9c01"
    worker: str
    cracks: tuple[CrackRecord, ...]
    mask: np.ndarray = field(repr=False)
    features: tuple[FeatureRecord, ...] = ()
    photos: tuple[CrackPhoto, ...] = ()

    def to_frames(self) -> list[bytes]:
        header = {name: getattr(self, name) for name in
                  ("run_id", "camera_id", "seq", "capture_time", "chainage_m", "inference_ms",
                   "model", "worker")}
        header.update(cracks=[c.to_dict() for c in self.cracks], encoding=MASK_ENCODING,
                      dtype="uint8", shape=list(self.mask.shape))
        if self.features:
            header["features"] = [f.to_dict() for f in self.features]
        if self.photos:
            header["photos"] = [{"crack": p.crack, "box_px": list(p.box_px)} for p in self.photos]
        return [_header_frame(self.TYPE, header), encode_pixels(self.mask, MASK_ENCODING),
                *(p.jpeg for p in self.photos)]

    @classmethod
    def from_frames(cls, frames: list[bytes], max_pixels: int = MAX_PIXELS) -> ResultMessage:
        if len(frames) < 2:
            raise WireError(f"a {cls.TYPE} message has 2 frames and a photo per crack, got "
                            f"{len(frames)}")
        h = parse_header(frames[0])
        shape = _take(h, "shape", list)
        if len(shape) != 2:
            raise WireError(f"a result mask is HxW, header says shape {shape}")
        cracks = tuple(CrackRecord.from_dict(c) for c in _take(h, "cracks", list))
        mask = decode_pixels(frames[1], _take(h, "encoding", str), _take(h, "dtype", str), shape,
                             max_pixels)
        photos = _photos(h, frames, cracks, shape)
        return cls(run_id=_take(h, "run_id", str), camera_id=_take(h, "camera_id", str),
                   seq=_count(h, "seq"), capture_time=_take(h, "capture_time", float),
                   chainage_m=_take(h, "chainage_m", float),
                   inference_ms=_take(h, "inference_ms", float), model=_take(h, "model", str),
                   worker=_take(h, "worker", str),
                   cracks=cracks, mask=mask, photos=photos,
                   features=tuple(FeatureRecord.from_dict(f)
                                  for f in (_take(h, "features", list) if "features" in h
                                            else [])))


@dataclass(frozen=True)
class EndOfStreamMessage:
    """A camera's stream of a run has ended. ``frames_sent`` is how many frame messages left
    acquisition, so management knows how many results to wait for."""

    TYPE: ClassVar[str] = "end"
    run_id: str
    camera_id: str
    ended_at: float
    frames_read: int  # frames taken from the source, good or bad
    frames_sent: int
    frames_dropped: int  # live mode: not sent because inference was behind
    frames_bad: int  # unreadable / corrupt frames skipped
    # or "stopped" (Ctrl-C / SIGTERM), "source_error", "recording_error" (--record failed)
    reason: str = "end_of_source"
    frames_recorded: int = 0  # written to the --record directory (0 when not recording)

    def to_frames(self) -> list[bytes]:
        return [_header_frame(self.TYPE, asdict(self))]

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> EndOfStreamMessage:
        _expect_frames(frames, 1, cls.TYPE)
        h = parse_header(frames[0])
        return cls(run_id=_take(h, "run_id", str), camera_id=_take(h, "camera_id", str),
                   ended_at=_take(h, "ended_at", float), frames_read=_count(h, "frames_read"),
                   frames_sent=_count(h, "frames_sent"),
                   frames_dropped=_count(h, "frames_dropped"),
                   frames_bad=_count(h, "frames_bad"), reason=_choice(h, "reason", END_REASONS),
                   # optional: an older sender leaves it out
                   frames_recorded=_count(h, "frames_recorded") if "frames_recorded" in h else 0)


FrameKey = tuple[str, int]  # (camera_id, seq): a frame of a run


def _frame_keys(h: dict[str, Any], name: str) -> tuple[FrameKey, ...]:
    """A list of [camera_id, seq] pairs."""
    raw = _take(h, name, list)
    if len(raw) > MAX_FRAME_KEYS:
        raise WireError(f"{h.get('type')} field {name!r} names {len(raw)} frames, more than "
                        f"{MAX_FRAME_KEYS}")
    keys = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], int) and not isinstance(item[1], bool)
                and 0 <= item[1] <= MAX_COUNT):
            raise WireError(f"{h.get('type')} field {name!r} must list [camera_id, seq] pairs")
        keys.append((item[0], item[1]))
    return tuple(keys)


def _positive(h: dict[str, Any], name: str) -> int:
    value = _count(h, name)
    if value < 1:
        raise WireError(f"{h.get('type')} field {name!r} must be at least 1")
    return value


@dataclass(frozen=True)
class CreditMessage:
    """A worker to acquisition, on the frame link. ``consumed``: frame messages it took off its
    queue since its last credit (the oldest it holds: a link keeps their order, so acquisition
    knows which, malformed ones included); of those, ``done`` had their results sent to
    management and ``failed`` could not be processed; anything else it took was unreadable.
    ``capacity``: frames it may hold at once. A worker introduces itself with ``consumed`` 0."""

    TYPE: ClassVar[str] = "credit"
    worker: str
    capacity: int
    consumed: int = 0
    done: tuple[FrameKey, ...] = ()
    failed: tuple[FrameKey, ...] = ()

    def to_frames(self) -> list[bytes]:
        return [_header_frame(self.TYPE, {
            "worker": self.worker, "capacity": self.capacity, "consumed": self.consumed,
            "done": [list(k) for k in self.done], "failed": [list(k) for k in self.failed]})]

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> CreditMessage:
        _expect_frames(frames, 1, cls.TYPE)
        h = parse_header(frames[0])
        return cls(worker=_take(h, "worker", str), capacity=_positive(h, "capacity"),
                   consumed=_count(h, "consumed"), done=_frame_keys(h, "done"),
                   failed=_frame_keys(h, "failed"))


@dataclass(frozen=True)
class HeartbeatMessage:
    """Alive. A worker sends it on the frame link every ``HEARTBEAT_S`` from a thread of its own
    (a frame that takes minutes does not make it look dead; ``capacity`` introduces it to an
    acquisition that started after it); acquisition sends it on the control link naming its run,
    so a management process that restarted knows where that run's ``stored`` reports go."""

    TYPE: ClassVar[str] = "heartbeat"
    sender: str
    run_id: str = ""  # acquisition's run; "" from a worker
    capacity: int = 0  # a worker's; 0 from acquisition

    def to_frames(self) -> list[bytes]:
        return [_header_frame(self.TYPE, asdict(self))]

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> HeartbeatMessage:
        _expect_frames(frames, 1, cls.TYPE)
        h = parse_header(frames[0])
        return cls(sender=_take(h, "sender", str), run_id=_take(h, "run_id", str),
                   capacity=_count(h, "capacity"))


@dataclass(frozen=True)
class StoredMessage:
    """Management to a run's acquisition: these frames' results are in the database (stored now,
    stored before, or refused for their data, which a re-send would not change), so acquisition
    forgets them."""

    TYPE: ClassVar[str] = "stored"
    run_id: str
    frames: tuple[FrameKey, ...]

    def to_frames(self) -> list[bytes]:
        return [_header_frame(self.TYPE, {"run_id": self.run_id,
                                          "frames": [list(k) for k in self.frames]})]

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> StoredMessage:
        _expect_frames(frames, 1, cls.TYPE)
        h = parse_header(frames[0])
        return cls(run_id=_take(h, "run_id", str), frames=_frame_keys(h, "frames"))


Message = (RunStartMessage | FrameMessage | ResultMessage | EndOfStreamMessage | CreditMessage
           | HeartbeatMessage | StoredMessage)
MESSAGE_TYPES: dict[str, type] = {
    m.TYPE: m for m in (RunStartMessage, FrameMessage, ResultMessage, EndOfStreamMessage,
                        CreditMessage, HeartbeatMessage, StoredMessage)}


def decode(frames: list[bytes], max_pixels: int = MAX_PIXELS) -> Message:
    """Any message from its frames; raises :class:`WireError`, and nothing else, for anything
    off-contract. An image of more than ``max_pixels`` is refused before it is decoded."""
    if not frames:
        raise WireError("empty message")
    kind = parse_header(frames[0]).get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {kind!r}; expected one of {sorted(MESSAGE_TYPES)}")
    if kind in (FrameMessage.TYPE, ResultMessage.TYPE):
        return MESSAGE_TYPES[kind].from_frames(frames, max_pixels)
    return MESSAGE_TYPES[kind].from_frames(frames)
