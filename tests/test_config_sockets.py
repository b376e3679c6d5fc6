"""Pipeline configuration and socket specs: defaults, validation, one-line errors."""

from pathlib import Path

import pytest
import zmq

from crackscan.config import ConfigError, PipelineConfig, SeverityConfig, load_pipeline_config
from crackscan.sockets import SocketSpec

REPO = Path(__file__).resolve().parents[1]


def test_shipped_pipeline_yaml_matches_the_built_in_defaults():
    assert load_pipeline_config(REPO / "configs" / "pipeline.yaml") == PipelineConfig()


def test_bad_config_values_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("camera:\n  mm_per_px_along: -1\n")
    with pytest.raises(ConfigError, match="camera.mm_per_px_along"):
        load_pipeline_config(path)
    path.write_text("camera:\n  colour: red\n")
    with pytest.raises(ConfigError, match="camera.colour"):
        load_pipeline_config(path)
    path.write_text("camera: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_pipeline_config(tmp_path / "missing.yaml")


def test_severity_classes_follow_width_thresholds():
    severity = SeverityConfig()
    assert [severity.classify(w) for w in (0.1, 0.25, 1.0, 4.0, 7.5)] == [
        "hairline", "fine", "medium", "wide", "severe"]
    with pytest.raises(ValueError):
        SeverityConfig(width_mm=(1.0, 0.5), names=("a", "b", "c"))


def test_socket_specs_parse_and_print_back():
    spec = SocketSpec.parse("push+bind:tcp://127.0.0.1:5555")
    assert (spec.pattern, spec.bind, spec.endpoint) == ("push", True, "tcp://127.0.0.1:5555")
    assert str(SocketSpec.parse("pull+connect:ipc:///tmp/x")) == "pull+connect:ipc:///tmp/x"


@pytest.mark.parametrize("text", [
    "push:tcp://127.0.0.1:1", "pub+bind:tcp://127.0.0.1:1", "push+listen:tcp://127.0.0.1:1",
    "push+bind:http://127.0.0.1:1", "push+bind:tcp://0.0.0.0:5555", "push+bind:tcp://*:5555",
    "push+bind:tcp://10.1.2.3:5555",
])
def test_bad_or_unauthenticated_socket_specs_are_refused(text):
    with pytest.raises(ValueError):
        SocketSpec.parse(text)


def test_a_link_carries_its_payload_and_replies_to_the_peer_that_sent_it(tmp_path):
    """The binding side (a ROUTER) learns who sent each message and can answer that peer
    alone (management's stored reports to a run's acquisition); a connecting side (a DEALER)
    named with a routing id is addressed by it (a worker on the frame link)."""
    context = zmq.Context()
    endpoint = f"ipc://{tmp_path}/s"
    pull = SocketSpec.parse(f"pull+bind:{endpoint}").open(context)
    push = SocketSpec.parse(f"push+connect:{endpoint}").open(context, routing_id="worker-1")
    other = SocketSpec.parse(f"push+connect:{endpoint}").open(context)
    push.send_multipart([b"a", b"b"])
    assert pull.poll(2000) and pull.recv_multipart() == [b"worker-1", b"a", b"b"]
    other.send(b"c")
    assert pull.poll(2000)
    peer, payload = pull.recv_multipart()
    assert payload == b"c" and peer != b"worker-1"
    pull.send_multipart([b"worker-1", b"reply"])
    assert push.poll(2000) and push.recv_multipart() == [b"reply"]
    assert not other.poll(100)
    other.close(0)
    push.close(0)
    pull.close(0)
    context.term()


def test_the_rig_example_parses_and_its_relative_files_sit_beside_it():
    config = load_pipeline_config(REPO / "configs" / "rig_two_cameras.yaml")
    assert [camera.id for camera in config.rig] == ["crown", "right_shoulder"]
    assert config.rig[1].arc_offset_mm == 3200.0 and config.rig[0].capture.fps == 30
    assert config.acquisition.position.file == REPO / "configs" / "odometer.csv"
    assert config.camera_for("right_shoulder").mm_per_px_across == 0.6
    assert config.camera_for("some_recorded_camera") == config.camera


def test_rig_cameras_need_unique_ids_and_sources(tmp_path):
    path = tmp_path / "rig.yaml"
    (tmp_path / "a.mp4").write_bytes(b"")
    path.write_text("rig:\n  - {id: a, source: a.mp4}\n  - {id: a, source: camera:1}\n")
    with pytest.raises(ConfigError, match="unique"):
        load_pipeline_config(path)
    path.write_text("rig:\n  - {id: a, source: a.mp4}\n  - {id: b}\n")
    with pytest.raises(ConfigError, match="need a 'source': b"):
        load_pipeline_config(path)
    path.write_text("rig:\n  - {id: a, source: a.mp4}\n  - {id: b, source: camera:1}\n")
    config = load_pipeline_config(path)
    assert config.rig[0].source == str(tmp_path / "a.mp4") and config.rig[1].source == "camera:1"
    path.write_text("acquisition:\n  position: {source: odometer}\n")
    with pytest.raises(ConfigError, match="needs 'file'"):
        load_pipeline_config(path)
