"""`raytune-it plan`: the planner's derivation, its CLI, calibration from a run, and bad input."""

import json
import subprocess
import sys

import pytest

from raytune_it.config import load_config, save_config
from raytune_it.plan.memory import GIB, LLAMA_SHAPES, estimate_memory, shape_of_config
from raytune_it.plan.planner import SURVEY_FULL_A800, SURVEY_LORA_A800, Workload, calibrate, flops_per_token, plan
from raytune_it.storage import local


def _cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "raytune_it", "plan", *args], capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.parametrize("size", list(SURVEY_FULL_A800))
def test_survey_full_tuning_column_comes_out(size):
    gpus, batch, hours = SURVEY_FULL_A800[size]
    result = plan(Workload(shape=LLAMA_SHAPES[size], method="full", server_type="a800-80g"))
    assert result.feasible and result.num_gpus == gpus and result.per_device_batch_size == batch
    # Hours are a model with stated throughput assumptions: close, not exact (docs/planner.md).
    assert result.est_hours == pytest.approx(hours, rel=0.25)
    # memory, not a policy, is what rules out the next smaller GPU count
    half = estimate_memory(LLAMA_SHAPES[size], method="full", num_gpus=gpus // 2, micro_batch=1, seq_len=512)
    assert half.total > 80 * GIB >= result.memory_gib["total"] * GIB


@pytest.mark.parametrize("size", list(SURVEY_LORA_A800))
def test_survey_lora_column_is_within_twice_the_published_hours(size):
    """The LoRA column has a published counterpart too (one A800-80G, INT8, rank 16): the planner, from
    independently grounded assumptions (docs/planner.md), lands within 2x of each row's hours."""
    gpus, batch, hours = SURVEY_LORA_A800[size]
    result = plan(Workload(shape=LLAMA_SHAPES[size], method="lora", server_type="a800-80g"))
    assert result.feasible and result.num_gpus == gpus
    assert hours / 2 < result.est_hours < hours * 2


def test_each_part_is_shown_and_lora_cannot_shard_what_does_not_fit():
    full = plan(Workload(shape=LLAMA_SHAPES["7B"], method="full", server_type="a800-80g"))
    assert {"weights", "gradients", "optimizer", "activations", "overhead", "zero_buffers"} <= full.memory_gib.keys()
    per_sequence = full.activation_gib_per_sequence
    assert per_sequence["with_checkpointing"] < per_sequence["without_checkpointing"] / 5
    assert full.inference["bf16"]["num_gpus"] == 1
    # batch 1 reads every weight once per token: bandwidth / bytes bounds the rate
    assert full.inference["bf16"]["max_tokens_per_second"] == pytest.approx(2.039e12 / (2 * full.parameters), rel=0.01)
    assert full.inference["int8"]["max_tokens_per_second"] > full.inference["bf16"]["max_tokens_per_second"]

    lora = plan(Workload(shape=LLAMA_SHAPES["7B"], method="lora", server_type="rtx3090-24g"))
    assert lora.feasible and lora.num_gpus == 1
    assert lora.memory_gib["weights"] < 8  # INT8 base: about one byte per linear weight
    too_big = plan(Workload(shape=LLAMA_SHAPES["30B"], method="lora", server_type="rtx3090-24g"))
    assert not too_big.feasible and "every GPU holds the whole base model" in too_big.reason
    # full tuning of the same model on the same servers shards over more GPUs instead
    assert plan(Workload(shape=LLAMA_SHAPES["30B"], method="full", server_type="rtx3090-24g")).num_gpus > 8


def test_more_data_or_epochs_means_proportionally_more_compute():
    base = plan(Workload(shape=LLAMA_SHAPES["13B"], method="lora", server_type="a800-80g"))
    double = plan(Workload(shape=LLAMA_SHAPES["13B"], method="lora", server_type="a800-80g", epochs=6))
    assert double.train_flops == pytest.approx(2 * base.train_flops)
    assert double.compute_hours == pytest.approx(2 * base.compute_hours, rel=0.01)


def test_cli_json_for_a_parameter_count_and_a_model_directory(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    data = json.loads(_cli("13B", "--method", "lora", "--server-type", "rtx3090-24g", "--json").stdout)
    assert data["method"] == "lora" and data["server_type"] == "rtx3090-24g" and data["num_gpus"] == 1
    assert {"num_gpus", "per_device_batch_size", "est_hours", "inference", "memory_gib", "assumptions"} <= data.keys()

    from_dir = json.loads(_cli(str(tiny_model_dir), "--records", "1000", "--mean-tokens", "100", "--json").stdout)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert from_dir["parameters"] == sum(p.numel() for p in model.parameters())
    assert from_dir["train_tokens"] == 1000 * 100 * 3

    readable = _cli("7B").stdout
    assert "GPUs (servers)" in readable and "est. tuning time" in readable and "sustained mfu" in readable


def test_cli_plans_a_job_config_with_its_data_measured(tmp_path):
    data = json.loads(_cli("tiny-lora", "data.builtin_records=300", "--json").stdout)
    assert data["method"] == "lora" and data["model"] == "tiny-llama"
    # measured through the pipeline (the train split: 5% held out for eval), not the Alpaca default
    assert 250 < data["assumptions"]["records"] < 300
    assert 20 < data["assumptions"]["mean_tokens_per_record"] < 512
    assert data["assumptions"]["global_batch_sequences"] == 8 * 2  # micro batch x workers of the preset


def test_cli_table_writes_markdown_with_the_survey_column(tmp_path):
    target = tmp_path / "plan.md"
    out = _cli("--table", "--markdown", str(target)).stdout
    assert "65B" in out and "rtx3090-24g" in out
    lines = [line for line in target.read_text().splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 4 * 2 * 2  # header + sizes x methods x server types
    assert "| 7B | full | a800-80g | 2 | 8 | 3.0 | 2 / 8 / 3.0 |" in target.read_text()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_calibration_replaces_the_assumed_throughput(tmp_path, where, request):
    from raytune_it.storage import local, open_location

    storage = request.getfixturevalue("s3_storage") if where == "s3" else str(tmp_path)
    config = load_config("tiny-lora", [f"run.storage={storage}"])
    run_dir = (open_location(storage) if where == "s3" else local(tmp_path)) / "tiny-lora"
    save_config(config, run_dir)
    (run_dir / "summary.json").write_text(json.dumps(
        {"tokens_per_second": 4000.0, "num_workers": 2, "device": "cpu", "server_type": "any"}))
    workload = Workload(shape=LLAMA_SHAPES["7B"], method="lora", server_type="a800-80g")
    calibrated = plan(calibrate(workload, run_dir.uri))
    assumed = plan(workload)
    assert calibrated.assumptions["calibrated_from"].startswith(run_dir.uri)
    # the tiny model's FLOPs per token (LoRA with checkpointing: 6 P) x 2,000 tokens/s per worker
    expected = flops_per_token(shape_of_config(config), "lora", True) * 2000
    assert flops_per_token(shape_of_config(config), "lora", True) == 6 * shape_of_config(config).parameters
    assert calibrated.sustained_tflops_per_gpu == pytest.approx(expected / 1e12, rel=0.01)
    # time scales with the throughput (LoRA on one GPU has no communication term)
    ratio = assumed.sustained_tflops_per_gpu / calibrated.sustained_tflops_per_gpu
    assert calibrated.est_hours == pytest.approx(assumed.est_hours * ratio, rel=0.01)


def test_bad_input_says_what_to_pass(tmp_path):
    unknown = _cli("no-such-thing", check=False)
    assert unknown.returncode == 2 and "plan takes a parameter count such as 7B" in unknown.stderr
    records = tmp_path / "x.jsonl"
    records.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    no_tokenizer = _cli("7B", "--data", str(records), check=False)
    assert no_tokenizer.returncode == 2 and "pass --tokenizer" in no_tokenizer.stderr
    no_run = _cli("7B", "--calibrate", str(tmp_path), check=False)
    assert no_run.returncode == 2 and "no summary.json" in no_run.stderr


def test_expected_batch1_rates_per_engine_sit_below_the_bound_and_calibrate_from_a_run(tmp_path):
    """Beside the bandwidth bound, each engine's expected batch-1 rate; a run's measured /v1/latency rates
    (serve.json) replace the assumed shares."""
    from raytune_it.plan.planner import ENGINE_BANDWIDTH_EFFICIENCY, measured_engine_efficiency

    result = plan(Workload(shape=LLAMA_SHAPES["7B"], method="full", server_type="a800-80g"))
    bf16 = result.inference["bf16"]
    for engine, share in ENGINE_BANDWIDTH_EFFICIENCY.items():
        expected = bf16["max_tokens_per_second"] * share
        assert bf16["expected_tokens_per_second"][engine] == pytest.approx(expected, rel=0.01)
    assert bf16["expected_tokens_per_second"]["transformers"] < bf16["expected_tokens_per_second"]["vllm"]
    # A run that served its base on an A800 with transformers at 40% of that base's bound (adapters ignored).
    config = load_config("tiny-run", [f"run.storage={tmp_path}", "scaling.server_type=a800-80g"])
    save_config(config, local(tmp_path))
    bound = 2.039e12 / (2 * shape_of_config(config).parameters)
    (tmp_path / "serve.json").write_text(json.dumps({
        "tiny-llama": {"adapter": None, "engine": "transformers", "tokens_per_second": 0.4 * bound},
        "lora-best": {"adapter": "x", "engine": "transformers", "tokens_per_second": 0.1 * bound}}))
    measured, source = measured_engine_efficiency(str(tmp_path))
    assert measured == {"transformers": pytest.approx(0.4, rel=1e-3)} and "transformers: 40%" in source
    calibrated = json.loads(_cli("7B", "--calibrate-inference", str(tmp_path), "--json").stdout)["inference"]["bf16"]
    assert calibrated["expected_tokens_per_second"]["transformers"] == pytest.approx(
        bf16["max_tokens_per_second"] * measured["transformers"], rel=0.01)
    assert calibrated["expected_tokens_per_second"]["vllm"] == bf16["expected_tokens_per_second"]["vllm"]


def test_the_config_memory_estimate_follows_the_zero_stage_and_the_methods_own_checkpointing():
    """One estimate for train's warning, the sweep's skips and the planner: it reads the ZeRO stage, and
    LoRA's checkpointing from the lora section (the deepspeed section does not apply to LoRA)."""
    from raytune_it.plan.planner import estimate_for_config

    def total(name, *overrides):
        return estimate_for_config(load_config(name, ["scaling.num_workers=4", *overrides])).total

    assert total("tiny-full", "deepspeed.zero_stage=1") > total("tiny-full", "deepspeed.zero_stage=3")
    assert total("tiny-lora", "lora.gradient_checkpointing=false") > total("tiny-lora")
    assert total("tiny-lora", "deepspeed.gradient_checkpointing=false") == total("tiny-lora")


def test_nf4_halves_the_base_and_costs_time_and_plan_shows_it_against_int8_on_both_servers():
    int8 = plan(Workload(shape=LLAMA_SHAPES["65B"], method="lora", server_type="a800-80g"))
    nf4 = plan(Workload(shape=LLAMA_SHAPES["65B"], method="lora", server_type="a800-80g", lora_quantization="nf4"))
    assert nf4.memory_gib["weights"] < 0.6 * int8.memory_gib["weights"]
    assert nf4.sustained_tflops_per_gpu < int8.sustained_tflops_per_gpu
    assert nf4.assumptions["lora_quantization"] == "nf4"
    data = json.loads(_cli("65B", "--method", "lora", "--json").stdout)
    rows = {(row["server"], row["base"]): row for row in data["quantization_comparison"]}
    assert set(rows) == {(s, q) for s in ("a800-80g", "rtx3090-24g") for q in ("int8", "nf4")}
    memory = "memory / GPU (GiB)"
    assert float(rows[("a800-80g", "nf4")][memory]) < float(rows[("a800-80g", "int8")][memory])


@pytest.mark.parametrize("preset", ["llama3-8b-full-a800", "llama3-8b-full-rtx3090", "llama3-8b-lora-a800",
                                    "llama3-8b-lora-rtx3090"])
def test_llama3_8b_presets_fit_their_server_type_by_the_planner(preset):
    """The Llama-3-8B presets' workers and batch are the planner's for that server type, and fit it."""
    from raytune_it.plan.memory import NAMED_SHAPES
    from raytune_it.plan.planner import config_fit_problem

    config = load_config(preset, ["model.name_or_path=tiny-llama", "data.path=builtin:tasks"])
    shape = NAMED_SHAPES["LLAMA3-8B"]
    assert config_fit_problem(config, shape) is None
    planned = plan(Workload(shape=shape, method=config.method, server_type=config.scaling.server_type,
                            lora_targets=list(config.lora.target_modules)))
    assert (planned.num_gpus, planned.per_device_batch_size, planned.gradient_accumulation_steps) == (
        config.scaling.num_workers, config.train.micro_batch_size, config.train.gradient_accumulation_steps)


def test_the_chunked_loss_is_the_batch_a_llama3_lora_plan_gains_on_a_3090():
    """Llama-3's 128k vocabulary: the full logits of a 512-token sequence are 0.6 GiB at the loss's backward,
    so the model's own loss caps an RTX 3090's LoRA batch well below what the chunked loss allows."""
    from raytune_it.plan.memory import NAMED_SHAPES, logits_bytes

    shape = NAMED_SHAPES["LLAMA3-8B"]
    chunked = plan(Workload(shape=shape, method="lora", server_type="rtx3090-24g"))
    full = plan(Workload(shape=shape, method="lora", server_type="rtx3090-24g", loss_chunk_tokens=None))
    assert full.max_batch_with_full_logits is None and chunked.max_batch_with_full_logits == full.max_batch_that_fits
    assert chunked.max_batch_that_fits >= 4 * full.max_batch_that_fits
    assert full.memory_gib["logits"] * GIB == pytest.approx(full.per_device_batch_size * 512 * shape.vocab * 10,
                                                             rel=1e-3)
    assert logits_bytes(8 * 512, shape.vocab, 256) == 256 * shape.vocab * 10


def test_a_tokenizer_or_data_flag_that_cannot_load_is_named_not_a_traceback(tmp_path, capsys):
    from raytune_it.cli import main

    records = tmp_path / "x.jsonl"
    records.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{")
    cases = {("--tokenizer", str(tmp_path)): "--tokenizer: '{}' holds no tokenizer".format(tmp_path),
             ("--tokenizer", "/no/such/model"): "--tokenizer: '/no/such/model' does not exist",
             ("--tokenizer", str(tmp_path / "broken")): "broken: cannot load its tokenizer",
             ("--tokenizer", "tiny-llama", "--data", "/no/such.jsonl"): "--data: '/no/such.jsonl' does not exist"}
    for flags, message in cases.items():
        data = () if "--data" in flags else ("--data", str(records))
        assert main(["plan", "7B", *flags, *data]) == 2
        assert message in capsys.readouterr().err


def test_markdown_output_that_cannot_be_written_is_named_not_a_traceback(tmp_path, capsys):
    from raytune_it.cli import main

    (tmp_path / "a-file").write_text("")
    for argv, message in ((["--table", "--markdown", str(tmp_path)], "--markdown: {} is a folder".format(tmp_path)),
                          (["--table", "--markdown", str(tmp_path / "a-file" / "t.md")], "--markdown: cannot write"),
                          (["7B", "--markdown", str(tmp_path / "t.md")], "--markdown writes the survey table: add")):
        assert main(["plan", *argv]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_calibrating_from_a_damaged_run_file_names_the_file(tmp_path, capsys):
    from raytune_it.cli import main

    save_config(load_config("tiny-lora", [f"run.storage={tmp_path}", "scaling.server_type=a800-80g"]), local(tmp_path))
    for file, text, flag, message in (
            ("summary.json", "{", "--calibrate", "summary.json: not valid JSON"),
            ("summary.json", '{"tokens_per_second": "x", "num_workers": 2}', "--calibrate",
             "summary.json: tokens_per_second is 'x', not a positive number"),
            ("summary.json", '{"tokens_per_second": 10}', "--calibrate", "summary.json: no 'num_workers'"),
            ("serve.json", "[1]", "--calibrate-inference", "serve.json: holds an array, not a JSON object"),
            ("serve.json", '{"base": {"engine": "vllm", "tokens_per_second": -1}}', "--calibrate-inference",
             "serve.json: tokens_per_second is -1, not a positive number")):
        (tmp_path / file).write_text(text)
        assert main(["plan", "7B", flag, str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert message in err and f"point {flag} at a finished run folder" in err, err
