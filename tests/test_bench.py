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

import binlat
from binlat import bench
from binlat.bench import inputs as bench_inputs
from binlat.bench import plan as bench_plan
from binlat.bench import training as bench_training
from binlat.bench.harness import PeakRSS, Table
from binlat.bench.throughput import BOUND_GOAL
from binlat.cli import main
from binlat.eval.report import render_table
from binlat.generators import DiffusionConfig, DiffusionTransformer

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


def test_tiny_bench_prints_eight_tables_and_writes_every_figure(tiny_run):
    code, text, result = tiny_run
    assert code == 0, text
    for i in range(1, 9):
        assert f"[{i}/8]" in text
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
    assert len(result["tables"]) == 8
    numbers = {k: v for k, v in result.items() if k not in ("meta", "tables", "hardware") and v is not None}
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers.values())
    # Cached and recomputed AR decoding must give the same bits; bf16 agreement is a share.
    assert all(v == 1.0 for k, v in numbers.items() if k.startswith("ar_") and k.endswith("_bits_equal_fraction"))
    hardware = result["hardware"]
    assert (
        hardware["model"] in text
        and hardware["threads"] >= 1
        and set(hardware["flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    )
    assert hardware["matmul_peak_fp32_gflops"] > 0 and hardware["matmul_peak_bf16_gflops"] > 0
    if native:
        assert 0 <= result["bf16_bit_agreement"] <= 1 and "[7/8] bfloat16 vs float32 inference\n" in text
    else:
        assert all(result[k] is None for k in bench.BF16_KEYS)
        assert "[7/8] bfloat16 vs float32 inference: SKIPPED" in text and "emulated: bf16 rows are skipped" in text
    for kind in ("tokenizer", "diffusion", "ar"):
        assert result[f"train_{kind}_images_per_s"] > 0 and result[f"train_{kind}_peak_rss_mib"] > 0
        assert 0 < result[f"train_{kind}_peak_fraction"] < 1  # a share of the measured peak
        if native:  # each trainer also in bf16, as binlat train runs it here, against its float32 step
            assert result[f"train_{kind}_bf16_speedup"] > 0 and result[f"train_{kind}_bf16_images_per_s"] > 0
            assert 0 <= result[f"train_{kind}_bf16_loss_rel_diff"] < 0.5
            assert f"target {kind} bf16 images/s vs float32 >= 2x" in text
        else:
            assert f"train_{kind}_bf16_speedup" not in result
    # table 8: generation at the shipped sizes beside its FLOP bound, the text encoder apart
    for kind in ("diffusion", "ar"):
        assert 0 < result[f"sample_bound_fraction_{kind}"] < 1 and result[f"sample_images_per_s_{kind}"] > 0
        if result[f"sample_bound_fraction_{kind}"] < BOUND_GOAL:  # a missed goal names where the batch's time goes
            assert f"why {kind} misses: sampling" in text and "one-image decodes" in text
        else:
            assert f"why {kind} misses" not in text
    assert result["sample_text_encoder_flops_per_prompt"] > 0 and "text encoder apart" in text
    # table 1 explains a missed batch-1 target by its measured cause; table 3 names its tokenizer
    assert "why batch 1 misses" in text and "operator calls" in text
    assert "tokenizer: tiny" in text and "SCALED" in text and result["meta"]["e2e_tokenizer"] == "preset"
    # table 3's targets: each size's speedup against that size's counted FLOP ratio, not a fixed number
    for size in (512, 1024):
        bound = result[f"e2e_{size}_flop_ratio"]
        verdict = "met" if result[f"e2e_{size}_speedup"] >= round(bound, 2) else "NOT met"
        assert f"target at {size} px (the FLOP ratio) >= {round(bound, 2):g}x: {verdict}" in text


def _hand_count(c: DiffusionConfig, n: int, k: int, m: int) -> int:
    """FLOPs of one DiffusionTransformer forward, written out layer by layer (2 FLOPs per multiply-add)."""
    d, b, r = c.dim, c.num_bits, c.mlp_ratio
    total = 2 * n * k * b * d  # x_embed
    total += 2 * n * 1 * d + 2 * n * d * d  # timestep fc1, fc2
    for _ in range(c.num_layers):
        total += 2 * n * d * 6 * d  # adaLN-Zero
        total += 2 * n * m * c.text_dim * d  # text_proj
        total += 2 * n * k * d * d  # q (image rows)
        total += 2 * 2 * n * (m + k) * d * d  # k, v ([text ; image] rows)
        total += 2 * n * k * (m + k) * d  # scores, all heads
        total += 2 * n * k * (m + k) * d  # values, all heads
        total += 2 * n * k * d * d  # out
        total += 2 * n * k * d * r * d * 2  # fc1 + fc2
    total += 2 * n * d * 2 * d  # output AdaLNContinuous
    total += 2 * n * k * d * b  # proj_out
    return total


@pytest.mark.parametrize("n,k,m", [(3, 16, 5), (1, 7, 32)])
def test_flop_counter_matches_hand_count_and_torch(n, k, m):
    cfg = DiffusionConfig(num_bits=8, num_tokens=16, num_layers=2, num_heads=2, head_dim=8, text_dim=12)
    flops = bench.diffusion_step_flops(cfg, n, m, k)
    assert flops["total"] == _hand_count(cfg, n, k, m)
    assert flops["total"] == sum(v for name, v in flops.items() if name != "total")
    # For the first case the numbers are small enough to check by hand: 808,800 FLOPs.
    if (n, k, m) == (3, 16, 5):
        assert flops["total"] == 808_800
    # torch's own counter on the meta device sees the same matrix products (attention decomposed to bmm).
    with torch.device("meta"):
        net = DiffusionTransformer(cfg)
        text = [torch.zeros(n, m, cfg.text_dim)] * cfg.num_layers
        counted = bench.counted_flops(
            lambda: net(torch.zeros(n, k, cfg.num_bits), torch.zeros(n), text, torch.ones(n, m, dtype=torch.bool))
        )
    assert counted == flops["total"]


@pytest.mark.parametrize("name", bench.PRESET_NAMES)
def test_presets_are_the_packaged_configs(name):
    """The bench's sizes come from binlat/presets, which in a checkout is configs/ itself (one copy)."""
    root = bench.preset_root()
    assert Path(str(root)) == Path(binlat.__file__).parent / "presets"
    preset = bench.load_preset(name)
    for kind in ("tokenizer", "diffusion", "ar"):
        packaged = root.joinpath(kind, f"{name}.json")
        assert preset.training[kind] == json.loads(packaged.read_text())
        if (CONFIGS / kind).is_dir():  # a checkout, not an installed wheel
            assert Path(str(packaged)).resolve() == (CONFIGS / kind / f"{name}.json").resolve()
    tokenizer = json.loads(root.joinpath("tokenizer", f"{name}.json").read_text())
    assert preset.tokenizer["patch_size"] == tokenizer["model"]["patch_size"]
    assert (preset.generator["num_tokens"], preset.generator["num_bits"]) == (
        tokenizer["model"]["num_tokens"],
        tokenizer["model"]["num_bits"],
    )
    assert preset.tokenizer_batch == tokenizer["batch_size"] and preset.image_size == tokenizer["image_size"]


@pytest.fixture
def preset_copy(tmp_path, monkeypatch):
    """A copy of the packaged presets that the bench reads instead (load_preset's cache cleared around it)."""
    for kind in ("tokenizer", "diffusion", "ar"):
        (tmp_path / kind).mkdir()
        for name in bench.PRESET_NAMES:
            (tmp_path / kind / f"{name}.json").write_text(
                bench.preset_root().joinpath(kind, f"{name}.json").read_text()
            )
    for extra in ("release", "shapes-64-stage1"):  # table 3's tokenizer, the shipped recipe's stage 1
        source = bench.preset_root().joinpath("tokenizer", f"{extra}.json")
        if source.is_file():
            (tmp_path / "tokenizer" / f"{extra}.json").write_text(source.read_text())
    monkeypatch.setattr(bench_plan, "preset_root", lambda: tmp_path)
    bench.load_preset.cache_clear()
    yield tmp_path
    bench.load_preset.cache_clear()


def _edit(path: Path, **model):
    cfg = json.loads(path.read_text())
    cfg["model"].update(model)
    path.write_text(json.dumps(cfg))


def test_the_bench_reads_presets_through_the_package(preset_copy):
    for kind in ("diffusion", "ar"):
        _edit(preset_copy / kind / "shapes-64.json", num_layers=3)
    plan = bench.make_plan("shapes-64", quick=True)
    assert plan.generator["num_layers"] == 3 and plan.preset.training["ar"]["model"]["num_layers"] == 3


def test_each_generator_kind_keeps_its_own_options(preset_copy):
    """The kinds share one body (its sizes must agree) but not their other options: the AR preset's grouped head
    (bit_groups) and text refiner reach the shipped recipe's AR networks (training and generation tables), the
    diffusion networks never see them, and the comparisons at other token grids time the body alone."""
    _edit(preset_copy / "ar" / "shapes-64.json", bit_groups=4, text_refiner_layers=1)
    plan = bench.make_plan("shapes-64", quick=True)
    assert "bit_groups" not in plan.generator
    assert plan.generator_fields("ar")["bit_groups"] == 4 and "bit_groups" not in plan.generator_fields("diffusion")
    assert bench_training.train_spec(plan, "ar")["config"]["model"]["bit_groups"] == 4
    # the comparisons (other token grids, the release's sampler) time the body alone: a 4-group head would not fit
    # their 64-bit tokens' groups
    assert bench_inputs.gen_config(plan, "ar", num_bits=64).bit_groups == 1


def test_broken_presets_are_named(preset_copy):
    _edit(preset_copy / "ar" / "shapes-64.json", num_layers=3)
    with pytest.raises(ValueError, match="different sizes"):
        bench.load_preset("shapes-64")
    (preset_copy / "tokenizer" / "paper-512.json").unlink()
    with pytest.raises(ValueError, match=r"presets/tokenizer/paper-512.json is missing"):
        bench.load_preset("paper-512")
    (preset_copy / "diffusion" / "paper-512.json").write_text('{"kind": "diffusion", "lr": "fast"}')
    (preset_copy / "tokenizer" / "paper-512.json").write_text("{}")
    with pytest.raises(ValueError, match=r"diffusion/paper-512.json is not a valid training config.*fix configs/"):
        bench.load_preset("paper-512")


def test_plans_and_timing():
    with pytest.raises(ValueError, match="unknown preset"):
        bench.make_plan("paper-2048")
    with pytest.raises(ValueError, match="different modes"):
        bench.make_plan(quick=True, tiny=True)
    quick = bench.make_plan("shapes-64", quick=True)
    assert quick.notes and quick.generator == bench.load_preset("shapes-64").generator
    assert quick.e2e_scaled == (512, 1024) and quick.e2e_base == 256 and quick.throughput_steps < quick.steps
    assert not quick.ar_compiled and not quick.efficiency_compiled
    full = bench.make_plan("shapes-64")
    assert full.ar_compiled and full.efficiency_compiled and not full.e2e_scaled and full.throughput_steps is None
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


@pytest.mark.parametrize("kind", ["tokenizer", "diffusion"])
def test_training_worker_times_the_trainers_own_step(kind, monkeypatch):
    from binlat.train.engine import Trainer

    calls = []
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, batches: calls.append(self.step) or step(self, batches))
    spec = bench_training.train_spec(bench.make_plan(tiny=True), kind)
    spec["threads"] = torch.get_num_threads()
    result = bench_training.train_worker(spec)
    assert calls == [0, 1]  # one warm-up step, then plan.train_steps (1) timed ones, all through Trainer.train_step
    assert len(result["times"]) == 1 and result["times"][0] > 0
    assert result["params"] > 0 and result["peak_rss_mib"] >= result["before_rss_mib"] > 0


def test_the_benchs_generator_task_loads_no_encoders_and_says_what_needs_them():
    """The bench trains a GeneratorTask built on given text states: no tokenizer or text encoder is loaded, the
    plan's model names the shapes, and training on images stops with a line naming what is missing."""
    from binlat.config import config_from_dict
    from binlat.train.config import TrainConfig
    from binlat.train.tasks import GeneratorTask

    spec = bench_training.train_spec(bench.make_plan(tiny=True), "diffusion")
    cfg = config_from_dict(TrainConfig, spec["config"], "bench training spec")
    task = bench_training._task_factory(spec)(cfg, torch.device("cpu"))
    assert isinstance(task, GeneratorTask) and task.tokenizer is task.text_encoder is task.cached_text is None
    assert task.model_config.text_dim == spec["config"]["model"]["text_dim"]
    batch = {"image": torch.zeros(1, 3, 8, 8), "caption": ["a red circle"], "index": torch.arange(1)}
    with pytest.raises(ValueError, match="training on images needs the frozen tokenizer and text encoder"):
        task.loss(task.model, batch, 0, [torch.Generator()])


def test_peak_rss_sees_an_allocation():
    peak = PeakRSS()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert peak.peak_mib() - peak.before_mib >= 60 and float(block[-1]) == 1.0


def test_bench_tables_print_through_the_report_printer():
    table = Table("[9/9] title", ["what", "n"], [["a", 1], ["bbb", 22]], notes=["how"], footer=["verdict"])
    assert render_table(table.to_dict(), indent="  ").splitlines() == [
        "[9/9] title",
        "  how",
        "  what   n",
        "  ----  --",
        "  a      1",
        "  bbb   22",
        "  verdict",
    ]


@pytest.mark.parametrize("quick", [True, False])
def test_end_to_end_uses_the_release_tokenizer(quick):
    """Table 3 decodes with the release's own tokenizer (patch 16, 2x2 stage after block 7, reference 1024)."""
    plan = bench.make_plan("shapes-64", quick=quick)
    release = json.loads(bench.preset_root().joinpath("tokenizer", "release.json").read_text())["model"]
    assert plan.e2e_tokenizer_name == "release"
    assert plan.e2e_tokenizer["patch_size"] == release["patch_size"] == 16
    assert tuple(plan.e2e_tokenizer["upsample_after"]) == (7,) and plan.e2e_tokenizer["rope_reference_size"] == 1024


def test_shipped_recipe_sizes():
    """Table 8 and table 5 time the shipped recipe: the stage-1 tokenizer config and the generators on its grid."""
    plan = bench.make_plan("shapes-64", quick=True)
    stage1 = bench.preset_root().joinpath("tokenizer", "shapes-64-stage1.json")
    assert plan.throughput_batch == 64
    if not stage1.is_file():
        assert plan.shipped_tokenizer == plan.tokenizer
        return
    model = json.loads(stage1.read_text())["model"]
    assert plan.shipped_tokenizer["num_tokens"] == model["num_tokens"] == plan.shipped_generator["num_tokens"]
    assert plan.shipped_generator["num_bits"] == model["num_bits"]
    assert bench_training.train_spec(plan, "tokenizer")["config"]["model"]["patch_size"] == model["patch_size"]
    g, p = plan.shipped_generator, plan.generator
    assert (g["num_layers"], g["num_heads"], g["head_dim"]) == (p["num_layers"], p["num_heads"], p["head_dim"])
