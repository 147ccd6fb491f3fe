"""glmtorch.cpuinfo: the CPU's model and instruction sets, as benchmark reports, the dispatch table and the kernels'
build name read them."""

from glmtorch.cpuinfo import MATRIX_FLAGS, cpu_description, cpu_model_and_flags

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx fma avx2
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx fma avx2
"""

ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def test_x86_and_arm_cpuinfo(tmp_path):
    (tmp_path / "x86").write_text(X86)
    (tmp_path / "arm").write_text(ARM)
    assert cpu_model_and_flags(str(tmp_path / "x86")) == ("AMD EPYC 7B13", ["fpu", "sse2", "avx", "fma", "avx2"])
    model, flags = cpu_model_and_flags(str(tmp_path / "arm"))  # ARM names no model; its instruction sets: Features
    assert model and "sve" in flags and "asimd" in flags


def test_no_cpuinfo_gives_platform_names(tmp_path):
    model, flags = cpu_model_and_flags(str(tmp_path / "missing"))
    assert model and flags == []


def test_description_keeps_the_matrix_flags():
    description = cpu_description()
    assert set(description["flags"]) <= set(MATRIX_FLAGS) and description["cores"] >= 1
