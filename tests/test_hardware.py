"""binlat.hardware: what the CPU computes natively, and bfloat16 refused (one line) where it would be emulated."""

from __future__ import annotations

import pytest
import torch

from binlat import hardware
from binlat.config import config_from_dict
from binlat.pipeline import Pipeline
from binlat.train.config import TrainConfig
from binlat.train.engine import Trainer
from tiny_models import TINY_TOKENIZER_MODEL

pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Pretend /proc/cpuinfo says `text` (no override in the environment)."""
    monkeypatch.delenv(hardware.ASSUME_BF16_ENV, raising=False)

    def use(text: str | None) -> hardware.CPUInfo:
        path = tmp_path / "cpuinfo"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
        monkeypatch.setattr(hardware, "CPUINFO", path)
        hardware.cpu_info.cache_clear()
        return hardware.cpu_info()

    yield use
    hardware.cpu_info.cache_clear()  # later tests read the real CPU again


def test_cpu_info_reads_model_and_the_flags_that_matter(cpu):
    xeon = cpu(XEON)
    assert xeon.model == "Intel(R) Xeon(R) Platinum 8480+" and xeon.source.endswith("cpuinfo")
    assert xeon.flags == ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # not fpu, sse2, amx_int8
    assert xeon.bf16_native and xeon.threads >= 1
    assert xeon.as_dict()["bf16_native"] is True and xeon.as_dict()["flags"] == list(xeon.flags)
    epyc = cpu(EPYC)
    assert epyc.model == "AMD EPYC 7B13" and epyc.flags == ("avx2",) and not epyc.bf16_native


def test_cpu_info_without_proc_cpuinfo(cpu):
    info = cpu(None)
    assert info.source == "platform" and info.model and info.flags == () and not info.bf16_native


def test_avx512_without_bf16_is_not_native(cpu):
    # avx512f alone (Skylake/Cascade Lake Xeons) converts bf16 but has no bf16 dot products: still emulated
    cpu(EPYC.replace("avx2 fma", "avx2 avx512f avx512bw avx512vl"))
    assert not hardware.bf16_native("cpu")


def test_the_real_cpu_is_described():
    info = hardware.cpu_info()
    assert info.model and info.threads >= 1
    assert set(info.flags) <= set(hardware.REPORTED_FLAGS)


def test_bf16_native_follows_the_flags_and_the_override(cpu, monkeypatch):
    cpu(EPYC)
    assert hardware.bf16_native("cpu") is False and hardware.bf16_native(torch.device("cpu")) is False
    monkeypatch.setenv(hardware.ASSUME_BF16_ENV, "1")
    assert hardware.bf16_native("cpu") is True
    cpu(XEON)
    monkeypatch.setenv(hardware.ASSUME_BF16_ENV, "0")
    assert hardware.bf16_native("cpu") is False
    monkeypatch.setenv(hardware.ASSUME_BF16_ENV, "")  # empty: no override
    assert hardware.bf16_native("cpu") is True
    monkeypatch.setenv(hardware.ASSUME_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="BINLAT_ASSUME_BF16 must be 1 or 0, got 'yes'"):
        hardware.bf16_native("cpu")


def test_bf16_native_on_cuda_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    assert hardware.bf16_native("cuda:0") is False
    with pytest.raises(ValueError, match="needs a GPU with bfloat16 support; Tesla V100 has none: use float32"):
        hardware.require_bf16("cuda:0", "bfloat16 generation")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.bf16_native("cuda") is True
    hardware.require_bf16("cuda", "bfloat16 generation")  # no error


def test_require_bf16_is_one_line_naming_the_cpu_and_the_fix(cpu):
    cpu(EPYC)
    with pytest.raises(ValueError) as refused:
        hardware.require_bf16("cpu", "bfloat16 generation", fix="use --dtype float32")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        "bfloat16 generation needs a CPU with native bf16 (avx512_bf16 or AMX); "
        "this AMD EPYC 7B13 has neither, so it would run ~100x slower: use --dtype float32"
    )
    cpu(XEON)
    hardware.require_bf16("cpu", "bfloat16 generation")  # no error


@pytest.fixture(scope="module")
def tiny():
    return Pipeline.random_tiny()


def test_pipeline_refuses_bf16_only_where_emulated(tiny, tmp_path, monkeypatch):
    bundle = tiny.save_pretrained(tmp_path / "bundle")
    monkeypatch.setenv(hardware.ASSUME_BF16_ENV, "0")
    with pytest.raises(ValueError, match="bfloat16 generation needs a CPU with native bf16.*keep float32"):
        tiny.to(dtype=torch.bfloat16)
    assert next(tiny.generators["diffusion"].parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="bfloat16 generation needs a CPU with native bf16"):
        Pipeline.from_pretrained(bundle, text_encoder=tiny.text_encoder, dtype=torch.bfloat16)
    tiny.to(dtype=torch.float32)  # float32 is never refused
    monkeypatch.setenv(hardware.ASSUME_BF16_ENV, "1")
    loaded = Pipeline.from_pretrained(bundle, text_encoder=tiny.text_encoder, dtype=torch.bfloat16)
    assert next(loaded.generators["ar"].parameters()).dtype == torch.bfloat16


def test_training_refuses_bf16_autocast_where_emulated(tmp_path, monkeypatch):
    monkeypatch.setenv(hardware.ASSUME_BF16_ENV, "0")
    model = dict(TINY_TOKENIZER_MODEL)
    cfg = config_from_dict(
        TrainConfig,
        {
            "kind": "tokenizer",
            "model": model,
            "image_size": 64,
            "batch_size": 4,
            "max_steps": 1,
            "trackers": [],
            "mixed_precision": "bf16",
        },
    )
    with pytest.raises(
        ValueError,
        match=r"bf16 mixed-precision training needs a CPU with native bf16.*"
        r"--set mixed_precision=no",
    ):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
