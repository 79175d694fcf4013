"""`binlat bench`: the tiny mode end to end through the CLI, and the pieces whose numbers must be exact.

No timing assertions: timings depend on the machine. The tiny run takes ~15 s (diffusers import, three training
subprocesses); it runs once per module."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from binlat.cli import main
from binlat.eval import bench
from binlat.generators import DiffusionTransformer, GeneratorConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module", params=["emulated", "native"])
def tiny_run(request, tmp_path_factory):
    """The tiny bench as on a CPU that emulates bf16 (its bf16 rows skipped) and as on one that computes it
    natively (BINLAT_ASSUME_BF16 decides which this machine pretends to be)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    buffer = io.StringIO()
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(buffer):
        m.setenv("BINLAT_ASSUME_BF16", "1" if request.param == "native" else "0")
        code = main(["bench", "--tiny", "--json", str(out)])
    return code, buffer.getvalue(), json.loads(out.read_text())


def test_tiny_bench_prints_seven_tables_and_writes_every_figure(tiny_run):
    code, text, result = tiny_run
    assert code == 0, text
    for i in range(1, 8):
        assert f"[{i}/7]" in text
    assert "FAILED" not in text
    assert "torch.get_num_threads() = " in text and bench.cpu_model() in text
    native = result["hardware"]["bf16_native"]
    for key in bench.REQUIRED_KEYS:
        value = result[key]
        if key in bench.BF16_KEYS and not native:
            assert value is None, key  # emulated bf16 is never reported as a speed
            continue
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        assert math.isfinite(value) and value > 0, (key, value)
    assert result["meta"]["mode"] == "tiny" and result["meta"]["failed"] == []
    assert len(result["tables"]) == 7
    numbers = {k: v for k, v in result.items() if k not in ("meta", "tables", "hardware") and v is not None}
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers.values())
    # Cached and recomputed AR decoding must give the same bits; bf16 agreement is a share.
    assert all(v == 1.0 for k, v in numbers.items() if k.startswith("ar_") and k.endswith("_bits_equal_fraction"))
    hardware = result["hardware"]
    assert hardware["model"] in text and hardware["threads"] >= 1 and set(hardware["flags"]) <= {
        "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert hardware["matmul_peak_fp32_gflops"] > 0 and hardware["matmul_peak_bf16_gflops"] > 0
    if native:
        assert 0 <= result["bf16_bit_agreement"] <= 1 and "[7/7] bfloat16 vs float32 inference\n" in text
    else:
        assert all(result[k] is None for k in bench.BF16_KEYS)
        assert "[7/7] bfloat16 vs float32 inference: SKIPPED" in text and "emulated: bf16 rows are skipped" in text
    for kind in ("tokenizer", "diffusion", "ar"):
        assert result[f"train_{kind}_images_per_s"] > 0 and result[f"train_{kind}_peak_rss_mib"] > 0


def _hand_count(c: GeneratorConfig, n: int, k: int, l: int) -> int:
    """FLOPs of one DiffusionTransformer forward, written out layer by layer (2 FLOPs per multiply-add)."""
    d, b, r = c.dim, c.num_bits, c.mlp_ratio
    total = 2 * n * k * b * d                    # x_embed
    total += 2 * n * 1 * d + 2 * n * d * d       # timestep fc1, fc2
    for _ in range(c.num_layers):
        total += 2 * n * d * 6 * d               # adaLN-Zero
        total += 2 * n * l * c.text_dim * d      # text_proj
        total += 2 * n * k * d * d               # q (image rows)
        total += 2 * 2 * n * (l + k) * d * d     # k, v ([text ; image] rows)
        total += 2 * n * k * (l + k) * d         # scores, all heads
        total += 2 * n * k * (l + k) * d         # values, all heads
        total += 2 * n * k * d * d               # out
        total += 2 * n * k * d * r * d * 2       # fc1 + fc2
    total += 2 * n * d * 2 * d                   # output AdaLNContinuous
    total += 2 * n * k * d * b                   # proj_out
    return total


@pytest.mark.parametrize("n,k,l", [(3, 16, 5), (1, 7, 32)])
def test_flop_counter_matches_hand_count_and_torch(n, k, l):
    cfg = GeneratorConfig(num_bits=8, num_tokens=16, num_layers=2, num_heads=2, head_dim=8, text_dim=12)
    flops = bench.diffusion_step_flops(cfg, n, l, k)
    assert flops["total"] == _hand_count(cfg, n, k, l)
    assert flops["total"] == sum(v for name, v in flops.items() if name != "total")
    # For the first case the numbers are small enough to check by hand: 808,800 FLOPs.
    if (n, k, l) == (3, 16, 5):
        assert flops["total"] == 808_800
    # torch's own counter on the meta device sees the same matrix products (attention decomposed to bmm).
    with torch.device("meta"):
        net = DiffusionTransformer(cfg)
        text = [torch.zeros(n, l, cfg.text_dim)] * cfg.num_layers
        counted = bench.counted_flops(lambda: net(torch.zeros(n, k, cfg.num_bits), torch.zeros(n), text,
                                                  torch.ones(n, l, dtype=torch.bool)))
    assert counted == flops["total"]


@pytest.mark.parametrize("name", sorted(bench.PRESETS))
def test_presets_mirror_the_config_files(name):
    preset = bench.PRESETS[name]
    for kind, sizes in (("tokenizer", preset.tokenizer), ("diffusion", preset.generator), ("ar", preset.generator)):
        path = CONFIGS / kind / f"{name}.json"
        if not path.is_file():
            pytest.skip(f"{path} not in this checkout")
        cfg = json.loads(path.read_text())
        want = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["model"].items()}
        have = {k: sizes[k] for k in want}
        assert have == want, (kind, name)
        assert preset.image_size == cfg["image_size"]
        assert (preset.tokenizer_batch if kind == "tokenizer" else preset.generator_batch) == cfg["batch_size"]
        assert preset.mixed_precision == (cfg.get("mixed_precision", "no") == "bf16")
        assert preset.grad_checkpointing == cfg.get("grad_checkpointing", False)


def test_plans_and_timing():
    with pytest.raises(ValueError, match="unknown preset"):
        bench.make_plan("paper-2048")
    with pytest.raises(ValueError, match="different modes"):
        bench.make_plan(quick=True, tiny=True)
    quick = bench.make_plan("shapes-64", quick=True)
    assert quick.e2e_composed and quick.notes and quick.generator == bench.PRESETS["shapes-64"].generator
    paper = bench.make_plan("paper-512", quick=True)
    assert paper.generator["num_layers"] == 2 and any("depth reduced" in n for n in paper.notes)
    calls = []
    m = bench.measure(lambda: calls.append(1) or len(calls), bench.Timing(2, 3, 5, 0.0))
    assert m.n == 3 and len(calls) == 5 and m.result == 5  # 2 warm-up calls, then min_runs once over budget
    m = bench.measure(lambda: None, bench.Timing(0, 1, 4, 1e9), max_runs=2)
    assert m.n == 2


def test_cli_modes_are_exclusive():
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", "--tiny"])
    assert e.value.code == 2


def test_json_folder_must_exist(tmp_path, capsys):
    assert main(["bench", "--tiny", "--json", str(tmp_path / "missing" / "out.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
