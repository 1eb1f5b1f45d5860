"""The CPU facts a run records: what decides whether bf16 autocast was on."""

from dgpo_bench.results import cpu_info

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx avx2 fma

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx avx2 fma avx512_bf16
"""


def test_cpu_info_reads_the_first_processor():
    assert cpu_info(ZEN3) == {"name": "AMD EPYC", "family": "25", "model": "1", "native_bf16": False}


def test_cpu_info_sees_native_bf16():
    zen4 = ZEN3.split("\n\n")[0].replace("model\t\t: 1", "model\t\t: 17").replace("fma", "fma avx512f avx512_bf16")
    info = cpu_info(zen4)
    assert info["native_bf16"] is True and info["model"] == "17"
    assert cpu_info(zen4.replace("avx512_bf16", "amx_bf16"))["native_bf16"] is True


def test_cpu_info_without_cpuinfo_still_answers():
    info = cpu_info("")
    assert info["native_bf16"] is False and info["family"] is None
