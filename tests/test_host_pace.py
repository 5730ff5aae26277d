"""The host's pace and the choice it informs (`batch_engine.host`): whether prefills replay as CUDA graphs
(`EngineSettings.prefill_graphs`: on, off, or `auto`, on where the host launches slowly). The pace is measured only
where graphs are captured, on a CUDA device; here its measure is replaced, so that each case runs on the CPU."""

from __future__ import annotations

import logging

import pytest

from batch_engine import host
from tests.vision_engine import engine
from vision_stage.glm_engine import GlmEngine

SLOW, KEPT_UP, LEAST_SLOW = 12.0, 6.0, 7.6
"""Launch paces in µs like those measured (`bench/RESULTS.md`): an H100 host that fell behind, one that kept up, and
the lowest reading of a host that fell behind (an H200's), whose prefills the graphs sped up."""
NAMED = "ORCH_VISION__ENGINE_PREFILL_GRAPHS"


def paced(monkeypatch: pytest.MonkeyPatch, pace: float) -> list[str]:
    """The host's measure made to give `pace`; the devices it was asked for, in order."""
    measured: list[str] = []

    def launch_pace(device: object) -> float:
        measured.append(str(device))
        return pace

    monkeypatch.setattr(host, "launch_pace", launch_pace)
    return measured


@pytest.mark.parametrize(
    ("setting", "pace", "chosen"),
    [
        (None, SLOW, True),
        (None, LEAST_SLOW, True),
        (None, KEPT_UP, False),
        (True, KEPT_UP, True),
        (False, SLOW, False),
        (True, SLOW, True),
    ],
)
def test_auto_replays_prefills_as_graphs_where_the_host_launches_slowly_and_a_setting_holds(
    monkeypatch: pytest.MonkeyPatch, setting: bool | None, pace: float, chosen: bool
) -> None:
    measured = paced(monkeypatch, pace)
    assert host.prefill_graphs(setting, "cuda", cuda_graphs=True, named=NAMED) is chosen
    assert measured == ["cuda"]


def test_a_slow_host_with_the_graphs_off_is_logged_with_a_warning_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    paced(monkeypatch, SLOW)
    with caplog.at_level(logging.INFO, logger="batch_engine"):
        host.prefill_graphs(False, "cuda", cuda_graphs=True, named=NAMED)
    info, warning = caplog.records
    assert "12.0 µs" in info.getMessage()
    assert "prefills as CUDA graphs off" in info.getMessage()
    assert warning.levelno == logging.WARNING
    assert NAMED in warning.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="batch_engine"):
        host.prefill_graphs(None, "cuda", cuda_graphs=True, named=NAMED)
        paced(monkeypatch, KEPT_UP)
        host.prefill_graphs(False, "cuda", cuda_graphs=True, named=NAMED)
    assert [record.levelno for record in caplog.records] == [logging.INFO, logging.INFO], (
        "no warning: graphs on, or fast"
    )


@pytest.mark.parametrize(("device", "cuda_graphs"), [("cpu", True), ("cuda", False)])
def test_without_graphs_to_capture_nothing_is_measured_and_auto_is_off(
    monkeypatch: pytest.MonkeyPatch, device: str, cuda_graphs: bool
) -> None:
    measured = paced(monkeypatch, SLOW)
    assert host.prefill_graphs(None, device, cuda_graphs=cuda_graphs, named=NAMED) is False
    assert host.prefill_graphs(True, device, cuda_graphs=cuda_graphs, named=NAMED) is True  # padded, run eagerly
    assert measured == []


def test_the_pace_is_a_launch_in_microseconds() -> None:
    pace = host.launch_pace("cpu", launches=50, rounds=3)
    assert 0 < pace < 100_000


@pytest.mark.parametrize(("setting", "padded"), [(None, False), (True, True), (False, False)])
def test_the_engine_decides_before_its_steps_are_built_and_names_its_setting(
    monkeypatch: pytest.MonkeyPatch, glm: GlmEngine, setting: bool | None, padded: bool
) -> None:
    asked: list[tuple[bool | None, str]] = []
    decide = host.prefill_graphs

    def prefill_graphs(setting: bool | None, device: object, *, cuda_graphs: bool, named: str) -> bool:
        asked.append((setting, named))
        return decide(setting, device, cuda_graphs=cuda_graphs, named=named)

    monkeypatch.setattr("batch_engine.engine.prefill_graphs", prefill_graphs)
    batch = engine(glm, prefill_graphs=setting)
    try:
        assert asked == [(setting, NAMED)]
        assert batch.settings.prefill_graphs is padded
        assert batch.device.padded is padded
    finally:
        batch.close()
