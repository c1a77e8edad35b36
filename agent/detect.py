"""What this machine has: RAM with psutil; VRAM, GPU model, utilisation, temperature with NVML.

No GPU is a normal machine, not an error: no `pynvml` module, no driver, no library, or no
device all read as zero VRAM and no GPU model. Only NVML's own errors (`pynvml.NVMLError` and
its subclasses) are caught, and per device, so one lost GPU does not hide the others.

Across GPUs: memory (total, free) is summed in bytes and floored to whole GiB once; utilisation
is the mean over the GPUs that report it; temperature is the hottest; the model names the GPUs,
e.g. "RTX 4090" or "2x RTX 4090" or "A100-SXM4-80GB + RTX 4090".

The NVML module is injectable (`GpuProbe.open(nvml=...)`): tests pass a stand-in object that
implements the functions used here.
"""

from __future__ import annotations

import logging
import platform
from collections import Counter
from typing import Any

import msgspec
import psutil

__all__ = ["GIB", "GpuProbe", "GpuReading", "MachineReading", "read_machine"]

log = logging.getLogger("mnemo.agent.detect")

GIB = 1024**3


class GpuReading(msgspec.Struct, frozen=True, kw_only=True):
    """All GPUs of the machine at one instant (sums and summaries; see the module docstring)."""

    count: int = 0
    model: str | None = None
    total_vram_bytes: int = 0
    free_vram_bytes: int = 0
    usage_pct: float | None = None
    temperature_c: int | None = None

    @property
    def total_vram_gb(self) -> int:
        return self.total_vram_bytes // GIB

    @property
    def free_vram_gb(self) -> int:
        return self.free_vram_bytes // GIB


NO_GPU = GpuReading()


def _model_summary(names: list[str]) -> str | None:
    if not names:
        return None
    counts = Counter(names)
    return " + ".join(name if n == 1 else f"{n}x {name}" for name, n in counts.items())


def _text(value: Any) -> str:
    # nvidia-ml-py returns str since 11.5; older releases (and some stand-ins) return bytes.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class GpuProbe:
    """An open NVML session (or none). `read()` samples every GPU; `close()` shuts NVML down."""

    def __init__(self, nvml: Any | None, handles: list[Any], names: list[str]) -> None:
        self._nvml = nvml
        self._handles = handles
        self._names = names

    @classmethod
    def open(cls, nvml: Any | None = None) -> GpuProbe:
        """Initialise NVML (importing `pynvml` unless a module is given); no GPU is not an error."""
        if nvml is None:
            try:
                import pynvml
            except ImportError:
                log.info("no GPU monitoring: nvidia-ml-py is not installed (VRAM reported as 0)")
                return cls(None, [], [])
            nvml = pynvml
        error = nvml.NVMLError
        try:
            nvml.nvmlInit()
        except error as exc:
            log.info("no GPU: NVML unavailable (%s); VRAM reported as 0", exc)
            return cls(None, [], [])
        handles: list[Any] = []
        names: list[str] = []
        try:
            count = nvml.nvmlDeviceGetCount()
        except error as exc:
            log.warning("NVML could not count GPUs (%s); VRAM reported as 0", exc)
            count = 0
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except error as exc:
                log.warning("GPU %d unreadable (%s); skipped", index, exc)
                continue
            try:
                name = _text(nvml.nvmlDeviceGetName(handle))
            except error:
                name = "Unknown GPU"
            handles.append(handle)
            names.append(name.removeprefix("NVIDIA ").strip() or "Unknown GPU")
        if not handles:
            cls._shutdown(nvml)
            return cls(None, [], [])
        return cls(nvml, handles, names)

    @property
    def present(self) -> bool:
        return bool(self._handles)

    def read(self) -> GpuReading:
        """Sample memory, utilisation and temperature of every GPU that answers."""
        nvml = self._nvml
        if nvml is None:
            return NO_GPU
        error = nvml.NVMLError
        total = free = 0
        usages: list[float] = []
        temps: list[int] = []
        names: list[str] = []
        for handle, name in zip(self._handles, self._names, strict=True):
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except error as exc:
                # A GPU that fell off the bus lends nothing until it comes back.
                log.warning("GPU %s: memory unreadable (%s); not offered", name, exc)
                continue
            names.append(name)
            total += int(memory.total)
            free += int(memory.free)
            try:
                usages.append(float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            except error:
                pass  # NotSupported on some boards; utilisation is informational
            try:
                temps.append(int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
            except error:
                pass
        return GpuReading(
            count=len(names),
            model=_model_summary(names),
            total_vram_bytes=total,
            free_vram_bytes=free,
            usage_pct=round(sum(usages) / len(usages), 1) if usages else None,
            temperature_c=max(temps) if temps else None,
        )

    @staticmethod
    def _shutdown(nvml: Any) -> None:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)

    def close(self) -> None:
        if self._nvml is not None:
            self._shutdown(self._nvml)
            self._nvml = None
            self._handles = []


class MachineReading(msgspec.Struct, frozen=True, kw_only=True):
    """One sample of the whole machine, in whole GiB (floored) for capacity."""

    total_ram_gb: int
    free_ram_gb: int
    cpu_usage_pct: float
    gpu: GpuReading

    @property
    def total_vram_gb(self) -> int:
        return self.gpu.total_vram_gb

    @property
    def free_vram_gb(self) -> int:
        return self.gpu.free_vram_gb


def read_machine(gpus: GpuProbe) -> MachineReading:
    """Sample RAM (psutil `available`, i.e. usable without swapping), CPU and GPUs.

    CPU usage is measured since the previous call (non-blocking), so the first call reads 0.
    """
    memory = psutil.virtual_memory()
    return MachineReading(
        total_ram_gb=memory.total // GIB,
        free_ram_gb=memory.available // GIB,
        cpu_usage_pct=float(psutil.cpu_percent(interval=None)),
        gpu=gpus.read(),
    )


def system_metadata(gpu: GpuReading) -> dict[str, str]:
    """Descriptive metadata sent at registration (all strings, as the market stores them)."""
    meta = {
        "os": platform.system() or "unknown",
        "cpu": platform.processor() or platform.machine() or "unknown",
        "cpu_cores": str(psutil.cpu_count(logical=True) or 0),
    }
    if gpu.model:
        meta["gpu_model"] = gpu.model
        meta["gpu_count"] = str(gpu.count)
    return meta
