"""The machine names that the benchmark tables carry in their headers."""

from __future__ import annotations

import platform

from benchmarks import reporting


def processor(index: int, name: str, family: int, model: int, flags: str) -> str:
    return (
        f"processor\t: {index}\nvendor_id\t: Vendor\ncpu family\t: {family}\nmodel\t\t: {model}\n"
        f"model name\t: {name}\nflags\t\t: fpu sse2 {flags} avx2\n"
    )


def test_the_first_processor_is_described_by_family_model_and_bf16_instructions() -> None:
    text = "\n".join([processor(0, "AMD EPYC", 26, 2, "avx512f avx512_bf16"), processor(1, "Other", 1, 1, "")])
    assert reporting.describe_cpu(text) == "AMD EPYC (family 26, model 2; avx512_bf16)"


def test_amx_is_named_before_avx512_bf16_and_their_absence_is_said() -> None:
    intel = processor(0, "Intel(R) Xeon(R) Platinum 8480+", 6, 143, "avx512_bf16 amx_tile amx_bf16")
    assert (
        reporting.describe_cpu(intel) == "Intel(R) Xeon(R) Platinum 8480+ (family 6, model 143; amx_bf16 avx512_bf16)"
    )
    older = processor(0, "AMD EPYC 7B12", 23, 49, "avx512f")
    assert reporting.describe_cpu(older) == "AMD EPYC 7B12 (family 23, model 49; no bf16 matmul instructions)"


def test_a_cpuinfo_without_model_names_falls_back_to_platform(tmp_path, monkeypatch) -> None:
    # Some ARM kernels list only "processor", "BogoMIPS" and "Features" lines.
    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n")
    assert reporting.describe_cpu(arm.read_text()) is None
    monkeypatch.setattr(reporting, "CPUINFO", arm)
    assert reporting.cpu_name() == (platform.processor() or platform.machine())
    monkeypatch.setattr(reporting, "CPUINFO", tmp_path / "missing")
    assert reporting.cpu_name() == (platform.processor() or platform.machine())
    assert reporting.run_stamp()["machine"].startswith(platform.processor() or platform.machine())
