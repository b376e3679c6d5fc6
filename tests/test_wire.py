"""The wire contract: every message round-trips, and receiving is strict."""

import json
import time

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import flip_bytes, replace_a_field

from crackscan import wire
from crackscan.wire import (
    CrackPhoto,
    CrackRecord,
    CreditMessage,
    EndOfStreamMessage,
    FeatureRecord,
    FrameMessage,
    HeartbeatMessage,
    ResultMessage,
    RunStartMessage,
    StoredMessage,
    WireError,
    decode,
)


def crack(index: int = 0) -> CrackRecord:
    return CrackRecord(
        index=index, length_px=200.5, length_mm=100.25, width_mean_mm=1.5, width_max_mm=2.5,
        width_p95_mm=2.25, width_max_px=5.0, orientation_deg=12.5, type="longitudinal",
        severity="medium", area_px=600, area_mm2=150.0, bbox_px=(10, 20, 200, 12),
        chainage_m=12.3, chainage_start_m=12.25, chainage_end_m=12.35, arc_mm=45.0,
        score_mean=0.875, polyline_px=((10.0, 20.0), (210.0, 30.0)),
        polyline=((12.25, 40.0), (12.35, 45.0)))


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_frame_round_trip_is_lossless(image, encoding):
    message = FrameMessage("run-1", "cam0", 7, 1700000000.25, 12.5, image, encoding)
    back = decode(message.to_frames())
    assert isinstance(back, FrameMessage)
    assert (back.run_id, back.camera_id, back.seq, back.capture_time, back.chainage_m) == (
        "run-1", "cam0", 7, 1700000000.25, 12.5)
    np.testing.assert_array_equal(back.image, image)


def test_frame_jpeg_is_close_and_grey_frames_travel(image):
    smooth = np.dstack([np.tile(np.arange(32, dtype=np.uint8) * 8, (24, 1))] * 3)
    back = decode(FrameMessage("r", "c", 0, 0.0, 0.0, smooth, "jpeg").to_frames())
    assert back.image.shape == smooth.shape
    assert np.abs(back.image.astype(int) - smooth).mean() < 4
    grey = image[:, :, 0]
    assert decode(FrameMessage("r", "c", 0, 0.0, 0.0, grey, "raw").to_frames()).image.shape == (
        24, 32)


def test_result_round_trip_keeps_cracks_and_mask():
    mask = np.zeros((24, 32), np.uint8)
    mask[5:8, 2:30] = 255
    message = ResultMessage("run-1", "cam0", 3, 5.5, 1.25, 42.0, "mobilenet_aspp@abcd", "w1",
                            (crack(0), crack(1)), mask)
    back = decode(message.to_frames())
    assert isinstance(back, ResultMessage)
    assert back.cracks == (crack(0), crack(1))
    np.testing.assert_array_equal(back.mask, mask)
    assert back.model == "mobilenet_aspp@abcd"


def test_a_result_mask_travels_as_bits_of_any_size():
    """One bit a pixel, also where H x W is no multiple of 8; a payload of the wrong length and
    bits for a colour shape are refused."""
    mask = np.where(np.random.default_rng(1).random((5, 7)) > 0.5, 255, 0).astype(np.uint8)
    frames = ResultMessage("r", "c", 0, 0.0, 0.0, 1.0, "m", "w", (), mask).to_frames()
    assert _header(frames)["encoding"] == "bits" and len(frames[1]) == 5  # ceil(35 / 8)
    np.testing.assert_array_equal(decode(frames).mask, mask)
    for payload in (frames[1][:-1], frames[1] + b"\x00"):
        with pytest.raises(WireError, match="bits hold"):
            decode([frames[0], payload])
    with pytest.raises(WireError, match="binary mask"):
        wire.decode_pixels(frames[1], "bits", "uint8", [5, 7, 3])
    frame = FrameMessage("r", "c", 0, 0.0, 0.0, mask, "raw").to_frames()
    with pytest.raises(WireError, match="encoding"):  # a frame's pixels are never bits
        decode(_with_header([frame[0], frames[1]], encoding="bits"))


def test_control_messages_round_trip():
    start = RunStartMessage("r", "drive.mp4", "replay", 10.5, ("cam0", "cam1"), {"a": 1})
    assert decode(start.to_frames()) == start
    end = EndOfStreamMessage("r", "cam0", 11.0, 10, 8, 1, 1, "stopped")
    assert decode(end.to_frames()) == end


def test_every_header_carries_protocol_and_version(image):
    for message in (FrameMessage("r", "c", 0, 0.0, 0.0, image),
                    EndOfStreamMessage("r", "c", 0.0, 0, 0, 0, 0)):
        header = json.loads(message.to_frames()[0])
        assert header["protocol"] == "crackscan" and header["v"] == wire.PROTOCOL_VERSION


def _header(frames):
    return json.loads(frames[0])


def _with_header(frames, **changes):
    header = _header(frames)
    header.update(changes)
    return [json.dumps(header).encode(), *frames[1:]]


def test_strict_receive_rejects_off_contract_messages(image):
    good = FrameMessage("r", "c", 0, 0.0, 0.0, image).to_frames()
    bad_cases = {
        "unknown version": _with_header(good, v=99),
        "other protocol": _with_header(good, protocol="other"),
        "unknown type": _with_header(good, type="nonsense"),
        "missing field": [json.dumps({k: v for k, v in _header(good).items() if k != "seq"}
                                     ).encode(), good[1]],
        "wrong field type": _with_header(good, seq="7"),
        "bool is not int": _with_header(good, seq=True),
        "negative seq": _with_header(good, seq=-1),
        "seq past 64 bits": _with_header(good, seq=2**63),
        "shape mismatch": _with_header(good, shape=[24, 31, 3]),
        "bad dtype": _with_header(good, dtype="float64"),
        "extra frame": good + [b"x"],
        "missing pixels": good[:1],
        "not json": [b"\xff\x00garbage", good[1]],
        "empty": [],
        "truncated pixels": [good[0], good[1][:-1]],
    }
    for name, frames in bad_cases.items():
        with pytest.raises(WireError):
            decode(frames)
            pytest.fail(f"accepted: {name}")


def test_corrupt_png_and_bad_crack_records_are_rejected():
    mask = np.zeros((8, 8), np.uint8)
    good = ResultMessage("r", "c", 0, 0.0, 0.0, 1.0, "m", "w", (crack(),), mask).to_frames()
    with pytest.raises(WireError):
        decode([good[0], b"\x89PNG not really"])
    header = _header(good)
    header["cracks"][0]["bbox_px"] = [1, 2, 3]
    with pytest.raises(WireError, match="bbox_px"):
        decode([json.dumps(header).encode(), good[1]])
    header = _header(good)
    header["cracks"][0]["length_mm"] = "long"
    with pytest.raises(WireError, match="length_mm"):
        decode([json.dumps(header).encode(), good[1]])
    header = _header(good)
    header["cracks"][0]["type"] = "pothole"
    with pytest.raises(WireError, match="type"):
        decode([json.dumps(header).encode(), good[1]])


def test_control_messages_check_their_enumerations():
    end = EndOfStreamMessage("r", "c", 0.0, 1, 1, 0, 0).to_frames()
    with pytest.raises(WireError, match="reason"):
        decode(_with_header(end, reason="bored"))
    with pytest.raises(WireError, match="frames_sent"):
        decode(_with_header(end, frames_sent=-3))
    start = RunStartMessage("r", "s", "replay", 0.0).to_frames()
    with pytest.raises(WireError, match="mode"):
        decode(_with_header(start, mode="turbo"))
    with pytest.raises(WireError, match="distinct"):
        decode(_with_header(start, cameras=["a", "a"]))


def feature(index: int = 0, kind: str = "joint") -> FeatureRecord:
    return FeatureRecord(
        index=index, kind=kind, area_px=768, area_mm2=3072.0, bbox_px=(150, 0, 8, 96),
        chainage_m=100.05, chainage_start_m=100.045, chainage_end_m=100.059, arc_mm=95.0,
        arc_start_mm=0.0, arc_end_mm=190.0, length_mm=192.0, orientation_deg=90.0)


def test_result_features_travel_and_are_checked():
    mask = np.zeros((8, 8), np.uint8)
    message = ResultMessage("r", "c", 0, 0.0, 0.0, 1.0, "m", "w", (crack(),), mask,
                            (feature(0), feature(1, "stain")))
    back = decode(message.to_frames())
    assert back.features == (feature(0), feature(1, "stain")) and back.cracks == (crack(),)
    plain = ResultMessage("r", "c", 0, 0.0, 0.0, 1.0, "m", "w", (), mask).to_frames()
    assert "features" not in _header(plain) and decode(plain).features == ()  # binary models
    good = message.to_frames()
    for change, match in ((lambda f: f.update(kind=""), "kind"),
                          (lambda f: f.update(kind="x" * 40), "kind"),
                          (lambda f: f.update(arc_start_mm=500.0), "arc_start_mm"),
                          (lambda f: f.update(area_px=-1), "area_px"),
                          (lambda f: f.update(colour="red"), "unknown"),
                          (lambda f: f.update(bbox_px=[1, 2]), "bbox_px")):
        header = _header(good)
        change(header["features"][0])
        with pytest.raises(WireError, match=match):
            decode([json.dumps(header).encode(), good[1]])
    header = _header(good)
    header["features"] = {"joint": 1}
    with pytest.raises(WireError, match="features"):
        decode([json.dumps(header).encode(), good[1]])


def _jpeg(width: int, height: int) -> bytes:
    ok, data = cv2.imencode(".jpg", np.full((height, width, 3), 120, np.uint8))
    return data.tobytes()


def test_result_photos_travel_and_are_checked():
    mask = np.zeros((64, 256), np.uint8)
    photo = CrackPhoto(crack=0, box_px=(2, 4, 230, 40), jpeg=_jpeg(230, 40))
    message = ResultMessage("r", "c", 0, 0.0, 0.0, 1.0, "m", "w", (crack(),), mask,
                            photos=(photo,))
    frames = message.to_frames()
    assert len(frames) == 3 and _header(frames)["photos"] == [{"crack": 0,
                                                                "box_px": [2, 4, 230, 40]}]
    assert decode(frames).photos == (photo,)
    header = _header(frames)
    for change, extra, match in (
            (lambda h: h["photos"][0].update(crack=7), None, "no such crack"),
            (lambda h: h["photos"].append(dict(h["photos"][0])), frames[2], "second photo"),
            (lambda h: h["photos"][0].update(box_px=[200, 0, 100, 10]), None, "inside"),
            (lambda h: h["photos"][0].update(box_px=[0, 0, 0, 10]), None, "inside"),
            (lambda h: h["photos"][0].update(box_px=[0, 0, 1]), None, "box_px"),
            (lambda h: h["photos"][0].update(size=3), None, "photo is"),
            (lambda h: h.update(photos={"0": 1}), None, "photos")):
        changed = json.loads(json.dumps(header))
        change(changed)
        with pytest.raises(WireError, match=match):
            decode([json.dumps(changed).encode(), *frames[1:], *([extra] if extra else [])])
    with pytest.raises(WireError, match="frame"):  # a photo announced, none sent
        decode(frames[:2])
    with pytest.raises(WireError, match="frame"):  # a photo sent, none announced
        decode([frames[0], frames[1], frames[2], frames[2]])
    for payload, match in ((b"not a jpeg", "not a JPEG"), (_jpeg(600, 20), "at most 512"),
                           (_jpeg(230, 40)[:200], "decode")):
        with pytest.raises(WireError, match=match):
            decode([frames[0], frames[1], payload])


# --- hostile bytes: WireError and nothing else ---------------------------------------------------

def _end_header() -> bytes:
    return EndOfStreamMessage("r", "c", 0.0, 1, 1, 0, 0).to_frames()[0]


def test_the_messages_that_once_stopped_a_stage_are_wire_errors(image):
    deep = b'{"protocol":"crackscan","v":1,"type":"end","x":' + b"[" * 200_000 + b"]" * 200_000
    long_ints = [_end_header()[:-1] + b',"frames_read":' + b"9" * digits + b"}"
                 for digits in (20, 400, 5000)]
    start = RunStartMessage("r", "s", "replay", 0.0).to_frames()
    frame_png = FrameMessage("r", "c", 0, 0.0, 0.0, image, "png").to_frames()
    result = ResultMessage("r", "c", 0, 0.0, 0.0, 1.0, "m", "w", (), np.zeros((8, 8), np.uint8)
                           ).to_frames()
    cases = {
        "nested 200,000 deep": [deep + b"}"],
        **{f"an integer of {len(f) - len(_end_header()) - 15} digits": [f] for f in long_ints},
        "cameras [['a']]": _with_header(start, cameras=[["a"]]),
        "NaN in a header": [_end_header()[:-1] + b',"x":NaN}'],
        "a PNG frame without pixels": [frame_png[0], b""],
        "a PNG mask without pixels": [result[0], b""],
        "a JPEG frame without pixels": [_with_header(frame_png, encoding="jpeg")[0], b""],
    }
    for name, frames in cases.items():
        with pytest.raises(WireError):
            decode(frames)
            pytest.fail(f"accepted: {name}")


def test_a_grey_raw_frame_with_one_channel_arrives_as_grey():
    grey = np.arange(64 * 48, dtype=np.uint8).reshape(48, 64, 1)
    back = decode(FrameMessage("r", "c", 0, 0.0, 0.0, grey, "raw").to_frames())
    assert back.image.shape == (48, 64)
    np.testing.assert_array_equal(back.image, grey[..., 0])


def test_a_decompression_bomb_is_refused_from_its_header_before_decoding():
    """A PNG of 8192 x 8192 zeros is a few tens of KB; decoding it takes 64 MB and seconds."""
    bomb = cv2.imencode(".png", np.zeros((8192, 8192), np.uint8))[1].tobytes()
    assert len(bomb) < 200_000
    small = FrameMessage("r", "c", 0, 0.0, 0.0, np.zeros((64, 64), np.uint8), "png").to_frames()
    started = time.perf_counter()
    with pytest.raises(WireError, match="over the budget"):
        decode([_with_header(small, shape=[8192, 8192])[0], bomb])
    with pytest.raises(WireError, match="declare 8192 x 8192"):  # its header lies about it
        decode([small[0], bomb])
    assert time.perf_counter() - started < 1.0  # refused from 24 bytes, never decoded
    assert decode([_with_header(small, shape=[8192, 8192])[0], bomb], max_pixels=8192 * 8192
                  ).image.shape == (8192, 8192)  # within a larger budget it is a frame


@pytest.mark.parametrize("shape", [(48, 80, 3), (48, 80)])
def test_a_jpeg_header_declares_its_size(shape):
    pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    frames = FrameMessage("r", "c", 0, 0.0, 0.0, pixels, "jpeg").to_frames()
    assert wire._image_size(frames[1], "jpeg") == (80, 48)
    with pytest.raises(WireError, match="declare 80 x 48"):
        decode(_with_header(frames, shape=[40, 80, 3][:len(shape)]))


def _valid_messages() -> list[list[bytes]]:
    image = np.random.default_rng(2).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    mask = np.zeros((12, 16), np.uint8)
    return [RunStartMessage("r", "s", "replay", 1.0, ("cam0", "cam1"), {"a": {"b": [1]}}
                            ).to_frames(),
            FrameMessage("r", "c", 3, 1.0, 2.0, image, "raw").to_frames(),
            FrameMessage("r", "c", 3, 1.0, 2.0, image, "png").to_frames(),
            FrameMessage("r", "c", 3, 1.0, 2.0, image, "jpeg").to_frames(),
            ResultMessage("r", "c", 3, 1.0, 2.0, 4.0, "m", "w", (crack(),), mask,
                          (feature(),)).to_frames(),
            ResultMessage("r", "c", 3, 1.0, 2.0, 4.0, "m", "w", (crack(),),
                          np.zeros((64, 256), np.uint8),
                          photos=(CrackPhoto(0, (0, 0, 16, 8), _jpeg(16, 8)),)).to_frames(),
            EndOfStreamMessage("r", "c", 1.0, 5, 5, 0, 0).to_frames(),
            CreditMessage("w", 2, 1, (("c", 3),), (("c", 4),)).to_frames(),
            HeartbeatMessage("acquisition", "r").to_frames(),
            StoredMessage("r", (("c", 3), ("c", 4))).to_frames()]


VALID = _valid_messages()


def _decodes_or_refuses(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_any_bytes_decode_or_are_a_wire_error(frames):
    _decodes_or_refuses(frames)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(len(VALID))), st.data())
def test_a_valid_message_with_any_field_replaced_decodes_or_is_a_wire_error(which, data):
    _decodes_or_refuses(replace_a_field(VALID[which], data))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(len(VALID))), st.data())
def test_a_valid_message_with_flipped_bytes_decodes_or_is_a_wire_error(which, data):
    _decodes_or_refuses(flip_bytes(VALID[which], data))
