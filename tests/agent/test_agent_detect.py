"""GPU detection through NVML, exercised with a stand-in module (there is no GPU here)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from agent.detect import GIB, GpuProbe, read_machine, system_metadata


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


class FakeNotSupported(FakeNVMLError):
    pass


class FakeNVML:
    """Implements the pynvml functions the agent calls, over a list of GPU dicts."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[dict[str, Any]], *, init_error: bool = False) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.initialised = False
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNVMLError("Driver Not Loaded")
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        if self.gpus[i].get("lost_at_open"):
            raise FakeNVMLError("GPU is lost")
        return i

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return self.gpus[h]["name"]

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        g = self.gpus[h]
        if g.get("lost"):
            raise FakeNVMLError("GPU is lost")
        return SimpleNamespace(total=g["total"], free=g["free"], used=g["total"] - g["free"])

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        if "util" not in self.gpus[h]:
            raise FakeNotSupported("Not Supported")
        return SimpleNamespace(gpu=self.gpus[h]["util"], memory=0)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        if "temp" not in self.gpus[h]:
            raise FakeNotSupported("Not Supported")
        return self.gpus[h]["temp"]


def _gpu(name: str | bytes, total_gib: float, free_gib: float, **extra: Any) -> dict[str, Any]:
    return {"name": name, "total": int(total_gib * GIB), "free": int(free_gib * GIB), **extra}


def test_sums_memory_over_all_gpus_in_bytes_then_floors() -> None:
    """Two 23.99 GiB cards read as 47 GiB total (sum first, floor once), free summed likewise."""
    nvml = FakeNVML(
        [
            _gpu("NVIDIA GeForce RTX 4090", 23.99, 10.6, util=50, temp=60),
            _gpu(b"NVIDIA GeForce RTX 4090", 23.99, 10.6, util=30, temp=71),
        ]
    )
    probe = GpuProbe.open(nvml)
    reading = probe.read()
    assert reading.count == 2
    assert reading.total_vram_gb == 47
    assert reading.free_vram_gb == 21
    assert reading.model == "2x GeForce RTX 4090"
    assert reading.usage_pct == 40.0
    assert reading.temperature_c == 71
    probe.close()
    assert nvml.shutdowns == 1


def test_mixed_models_and_unsupported_sensors() -> None:
    """Mixed cards are named together; sensors that are not supported read as unknown."""
    nvml = FakeNVML([_gpu("NVIDIA A100-SXM4-80GB", 80, 80, util=10), _gpu("Tesla T4", 16, 15)])
    reading = GpuProbe.open(nvml).read()
    assert reading.model == "A100-SXM4-80GB + Tesla T4"
    assert reading.total_vram_gb == 96 and reading.free_vram_gb == 95
    assert reading.usage_pct == 10.0
    assert reading.temperature_c is None


def test_a_lost_gpu_is_skipped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    """A GPU whose memory read fails is left out of the sums; the others still count."""
    nvml = FakeNVML([_gpu("A", 8, 8, util=1, temp=40), _gpu("B", 16, 4, util=3, temp=50)])
    probe = GpuProbe.open(nvml)
    nvml.gpus[0]["lost"] = True
    with caplog.at_level(logging.WARNING, logger="mnemo.agent.detect"):
        reading = probe.read()
    assert reading.count == 1 and reading.model == "B"
    assert reading.total_vram_gb == 16 and reading.free_vram_gb == 4
    assert "memory unreadable" in caplog.text


def test_unopenable_gpu_is_skipped_at_open() -> None:
    """A GPU whose handle cannot be had at start-up is left out; the rest is read."""
    nvml = FakeNVML([_gpu("A", 8, 8, lost_at_open=True), _gpu("B", 16, 4)])
    reading = GpuProbe.open(nvml).read()
    assert reading.count == 1 and reading.total_vram_gb == 16


def test_no_driver_or_no_gpu_is_zero_vram() -> None:
    """NVML failing to initialise, or zero devices, reads as no GPU (0 VRAM), not an error."""
    for nvml in (FakeNVML([], init_error=True), FakeNVML([])):
        probe = GpuProbe.open(nvml)
        assert not probe.present
        reading = probe.read()
        assert reading.count == 0 and reading.total_vram_gb == 0 and reading.model is None
        probe.close()


def test_real_module_agrees_with_nvml_itself() -> None:
    """With the real pynvml, the probe reads what NVML itself reports: on a machine without an
    NVIDIA driver NVML refuses to start and the probe reads 0 VRAM and no model; with GPUs, the
    probe's total is NVML's own sum over the devices, in whole GiB."""
    pynvml = pytest.importorskip("pynvml")
    probe = GpuProbe.open()
    try:
        reading = probe.read()
        if not probe.present:
            assert reading.total_vram_gb == 0 and reading.model is None and reading.count == 0
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError:
                return  # no driver here, as the probe said
            try:
                assert pynvml.nvmlDeviceGetCount() == 0, "NVML sees GPUs the probe missed"
            finally:
                pynvml.nvmlShutdown()
            return
        pynvml.nvmlInit()
        try:
            handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
            total = sum(pynvml.nvmlDeviceGetMemoryInfo(h).total for h in handles)
        finally:
            pynvml.nvmlShutdown()
        assert reading.count == len(handles) > 0
        assert reading.total_vram_gb == total // GIB > 0
        assert 0 <= reading.free_vram_gb <= reading.total_vram_gb
    finally:
        probe.close()


def test_read_machine_reports_ram_and_metadata_strings() -> None:
    """psutil RAM is whole GiB, free <= total; metadata values are all strings."""
    nvml = FakeNVML([_gpu("NVIDIA RTX 3090", 24, 20)])
    probe = GpuProbe.open(nvml)
    machine = read_machine(probe)
    assert 0 <= machine.free_ram_gb <= machine.total_ram_gb
    assert machine.total_vram_gb == 24 and machine.free_vram_gb == 20
    meta = system_metadata(machine.gpu)
    assert meta["gpu_model"] == "RTX 3090"
    assert all(isinstance(v, str) for v in meta.values())
