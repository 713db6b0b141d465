"""Device presets and the budget check.

Each preset's hardware figures come from the vendor's public spec sheet, cited beside it. The
limits derived from them (how much of the flash or RAM a model may take, the latency a feature
needs) are this project's policy and are labelled as such: change them with an inline budget.
Latency is measured on the host that runs the sweep, at the device's thread count.
"""

from __future__ import annotations

from shrinkflow.errors import SpecError
from shrinkflow.specs import Budget, Frozen, Miss, Report, Verdict

MB = 1_000_000


#: Application CPUs (Cortex-A, x86) run both: a torch.export program and an ExecuTorch program
#: with the XNNPACK delegate.
APP_CPU = ("torch", "executorch")
#: Linux gateways (Raspberry Pi, Jetson) also run ONNX Runtime, the runtime they usually ship with.
GATEWAY = (*APP_CPU, "onnx")


class DeviceProfile(Frozen):
    name: str
    title: str
    budget: Budget
    active_power_w: float
    source: str
    #: The runtimes (keys of shrinkflow.artifact.RUNTIMES) whose programs this device executes; a
    #: recipe for another runtime is not eligible there.
    runtimes: tuple[str, ...] = APP_CPU


DEVICES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            name="mcu-nrf52840",
            title="Microcontroller board: Arduino Nano 33 BLE Sense (nRF52840, Cortex-M4F 64 MHz, 1 MB flash, 256 KB RAM)",
            # Policy: the model gets 10% of the 1 MB flash (the rest holds firmware, runtime and an
            # OTA slot); weights plus activations within the 256 KB SRAM; 1 thread; 1-point drop.
            budget=Budget(max_size_mb=0.1, max_peak_memory_mb=0.256, max_latency_ms=50.0,
                          max_energy_mj=1.0, max_quality_drop=0.01, threads=1),
            active_power_w=0.02,  # ~6 mA at 3 V with the CPU running from flash (nRF52840 PS v1.7, 5.2.1.2)
            source="https://docs.arduino.cc/hardware/nano-33-ble-sense ; nRF52840 Product Specification v1.7",
            # XNNPACK needs an application CPU (Arm NEON or x86 SIMD): a .pte lowered to it cannot run
            # on a Cortex-M4. The torch.export program is the portable graph an MCU toolchain lowers.
            runtimes=("torch",),
        ),
        DeviceProfile(
            name="rpi4",
            title="Raspberry Pi 4 Model B (4x Cortex-A72 1.8 GHz, 4 GB LPDDR4)",
            # Policy: 64 MB model, 256 MB for inference, 20 ms per call, 2-point drop.
            budget=Budget(max_size_mb=64, max_peak_memory_mb=256, max_latency_ms=20.0,
                          max_energy_mj=150.0, max_quality_drop=0.02, threads=4),
            active_power_w=6.4,  # full-load board power, Raspberry Pi 4 product brief (power: 5 V 3 A supply)
            source="https://datasheets.raspberrypi.com/rpi4/raspberry-pi-4-product-brief.pdf",
            runtimes=GATEWAY,
        ),
        DeviceProfile(
            name="phone",
            title="Mid-range phone (4 big cores, 6-8 GB RAM; e.g. Pixel 7a, Google Tensor G2)",
            # Policy: 25 MB in the app bundle, 200 MB at run time, 15 ms per call, 2-point drop.
            budget=Budget(max_size_mb=25, max_peak_memory_mb=200, max_latency_ms=15.0,
                          max_energy_mj=60.0, max_quality_drop=0.02, threads=4),
            active_power_w=3.5,  # sustained SoC power of a phone under CPU load (Pixel 7a spec page: 4385 mAh)
            source="https://store.google.com/product/pixel_7a_specs",
        ),
        DeviceProfile(
            name="phone-entry",
            title="Entry-level Android (Go edition) phone (8x Cortex-A55 class, 2-3 GB RAM; e.g. Samsung Galaxy A05)",
            # Policy: 15 MB of the app bundle (Go-edition devices ship with little storage and apps
            # are kept small), 100 MB at run time, 10 ms per call on the host, 2-point drop.
            budget=Budget(max_size_mb=15, max_peak_memory_mb=100, max_latency_ms=10.0,
                          max_energy_mj=30.0, max_quality_drop=0.02, threads=4),
            active_power_w=2.0,  # sustained SoC power of a low-end phone under CPU load (5000 mAh class battery)
            source="https://developer.android.com/guide/topics/androidgo ; https://www.samsung.com/levant/smartphones/galaxy-a/galaxy-a05/",
        ),
        DeviceProfile(
            name="jetson-orin-nano",
            title="NVIDIA Jetson Orin Nano 8GB module (6x Cortex-A78AE, 8 GB LPDDR5, 7-15 W modes)",
            budget=Budget(max_size_mb=200, max_peak_memory_mb=1024, max_latency_ms=10.0,
                          max_energy_mj=150.0, max_quality_drop=0.02, threads=6),
            active_power_w=15.0,  # highest power mode, Jetson Orin Nano series data sheet DS-11105
            source="https://developer.nvidia.com/embedded/jetson-modules (Jetson Orin Nano DS-11105)",
            runtimes=GATEWAY,
        ),
    )
}


def device(name: str) -> DeviceProfile:
    try:
        return DEVICES[name]
    except KeyError:
        msg = f"Unknown device {name!r} for field 'device'; expected one of {sorted(DEVICES)}."
        raise SpecError(msg) from None


def resolve(name: str, override: Budget | None = None) -> tuple[DeviceProfile, Budget]:
    """The device preset and its budget with any non-None fields of ``override`` laid over it."""
    prof = device(name)
    if override is None:
        return prof, prof.budget
    merged = prof.budget.model_dump() | override.model_dump(exclude_unset=True)
    return prof, Budget(**merged)


def ood_metric(metric: str, name: str) -> str:
    """The ``Report.extra`` name of ``metric`` on out-of-domain set ``name`` (``quality_ood_pydoc``)."""
    return f"{metric}_ood_{name}"


#: ``Report.extra`` records, per OOD set, the teacher's quality there minus the variant's, so that
#: a record is judged again (``pipeline.rejudge``) without the teacher.
DROP_PREFIX = ood_metric("quality_drop", "")


def quality_drops(report: Report, quality: float | None, baseline_quality: float | None) -> dict[str, float]:
    """The drop against the teacher on every set evaluated: ``"test"`` (in-domain, when both
    qualities are known) and ``"ood:<name>"`` for each out-of-domain set in ``report.extra``."""
    drops = {"test": baseline_quality - quality} if quality is not None and baseline_quality is not None else {}
    return drops | {f"ood:{k[len(DROP_PREFIX):]}": v for k, v in report.extra.items() if k.startswith(DROP_PREFIX)}


def worst_drop(drops: dict[str, float]) -> str | None:
    """The set with the largest drop (a NaN, a broken model's quality, is the worst), or None."""
    return max(drops, key=lambda k: float("inf") if drops[k] != drops[k] else drops[k], default=None)


def check(report: Report, quality: float | None, baseline_quality: float | None, budget: Budget) -> Verdict:
    """Compare a measured variant with a budget. Never raises on a miss: it lists every broken limit.
    ``max_quality_drop`` applies to the worst set (:func:`quality_drops`); its miss names that set."""
    candidates = [
        ("max_size_mb", report.size_bytes / MB, budget.max_size_mb),
        ("max_latency_ms", report.latency_p50_ms, budget.max_latency_ms),
        ("max_peak_memory_mb", report.peak_memory_bytes / MB, budget.max_peak_memory_mb),
        ("max_energy_mj", report.energy_mj, budget.max_energy_mj),
    ]
    drops = quality_drops(report, quality, baseline_quality)
    worst = worst_drop(drops)
    if worst is not None:
        candidates.append(("max_quality_drop", drops[worst], budget.max_quality_drop))
    misses = tuple(
        Miss(limit=name, value=float(value), allowed=float(allowed),
             worst_set=worst if name == "max_quality_drop" else None)
        for name, value, allowed in candidates
        if allowed is not None and not value <= allowed  # NaN (a broken model's quality) is a miss
    )
    return Verdict(fits=not misses, misses=misses)
