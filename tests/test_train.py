"""Ray Train jobs on a real local Ray: 2-worker ZeRO-3 and INT8 LoRA, a killed worker, bad input."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from helpers import SUMMARY_KEYS, generate_text, latest_checkpoint_step, raw_metrics
from raytune_it.config import load_config
from raytune_it.errors import ConfigError, UserError
from raytune_it.storage import local, open_location
from raytune_it.train.driver import run_dir_of, train

pytestmark = pytest.mark.integration


def test_bad_inputs_fail_before_any_worker(tmp_path):
    import ray

    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match="scaling.num_workers: got 0"):
        train(load_config("tiny-lora", [f"run.storage={tmp_path}", "scaling.num_workers=0"]))
    with pytest.raises(ConfigError, match="model.name_or_path: '/no/such/model' does not exist"):
        train(load_config("tiny-lora", [f"run.storage={tmp_path}", "model.name_or_path=/no/such/model"]))
    with pytest.raises(ConfigError, match=r"lora.target_modules: the model has no module named 'query_key'.*q_proj"):
        train(load_config("tiny-lora", [f"run.storage={tmp_path}", "lora.target_modules=[q_proj,query_key]"]))
    # tiny-llama's q_proj is 256 x 256 and its MLP 256 x 688: 256 is the largest rank any of them can use
    with pytest.raises(ConfigError, match=r"lora.rank=1000000000: .* \(q_proj: 256\).* at most 256"):
        train(load_config("tiny-lora", [f"run.storage={tmp_path}", "lora.rank=1000000000"]))
    with pytest.raises(ConfigError, match=r"lora.rank=257: .* \(down_proj: 256\)"):
        train(load_config("tiny-lora", [f"run.storage={tmp_path}", "lora.rank=257", "lora.target_modules=[down_proj]"]))
    with pytest.raises(ConfigError, match="sequences per step, but the training split has only"):
        train(load_config("tiny-lora", [f"run.storage={tmp_path}", "data.builtin_records=20",
                                        "train.micro_batch_size=64"]))
    assert not ray.is_initialized(), "no Ray cluster (so no worker) was started for a bad config"
    assert not any(tmp_path.glob("*/checkpoints"))


def _common(tmp_path, *extra, steps=24):
    """A run of ``steps`` steps that evaluates and checkpoints three times (in tmp_path unless ``extra`` names
    another run.storage)."""
    return [f"run.storage={tmp_path}", f"train.max_steps={steps}", f"train.eval_every_steps={steps // 3}", *extra]


def _check_run_folder(run_dir, summary, steps=24):
    data = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= data.keys()
    assert data["num_workers"] == 2 and data["steps"] == steps and data["train_tokens"] > 0
    assert data["tokens_per_second"] > 0 and data["peak_memory_bytes"] > 0 and data["tuning_seconds"] > 0
    # Training throughput is over training time; eval and checkpoints are booked apart and add to tuning time.
    assert data["eval_seconds"] > 0 and data["checkpoint_seconds"] > 0
    assert data["tuning_seconds"] == pytest.approx(data["train_seconds"] + data["eval_seconds"]
                                                   + data["checkpoint_seconds"], abs=0.01)
    assert data["tokens_per_second"] == pytest.approx(data["train_tokens"] / data["train_seconds"], rel=0.01)
    history = [m for m in raw_metrics(run_dir)]
    assert [m["step"] for m in history] == list(range(1, steps + 1)), "metrics are reported every step"
    evals = [m["eval_loss"] for m in history if "eval_loss" in m]
    assert len(evals) == 3  # a third of the way, two thirds, the end
    # the loss decreases: first steps against last steps, and eval loss first against last
    first = sum(m["loss"] for m in history[:3]) / 3
    last = sum(m["loss"] for m in history[-3:]) / 3
    assert last < first - 0.3, (first, last)
    assert evals[-1] < evals[0]
    assert data["final_eval_loss"] == pytest.approx(evals[-1])
    assert (run_dir / "config.yaml").is_file()
    checkpoints = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert 1 <= len(checkpoints) <= 2, "CheckpointConfig keeps the best 2"


#: A constant schedule, so that a resumed run's longer max_steps does not change the learning rates.
RESUMABLE = ["train.lr_schedule=constant", "train.warmup_ratio=0"]


def _resumed_takes_the_straight_runs_steps(method, tmp_path, straight_dir, settings, steps=24, resumed_settings=(),
                                           storage=None):
    """A run stopped at its first checkpoint (a third of ``steps``) and continued to ``steps`` by running the
    same name again (in ``storage``, tmp_path by default) takes exactly the steps of the run that went
    straight there. Returns both histories and the continued run's summary."""
    stop = steps // 3
    storage = storage or str(tmp_path)
    settings = [*settings, *resumed_settings, f"run.storage={storage}", "run.name=resumed"]
    train(load_config(method, _common(tmp_path, *settings, steps=steps) + [f"train.max_steps={stop}"]))
    summary = train(load_config(method, _common(tmp_path, *settings, steps=steps)))
    resumed, straight = raw_metrics(open_location(storage) / "resumed"), raw_metrics(straight_dir)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1)), "the steps after the checkpoint follow it"
    assert [m["restarts"] for m in resumed] == [0] * stop + [1] * (steps - stop)
    assert summary.restarts == 1, "the re-run by name continued from the first's checkpoint"
    assert resumed[stop]["loss"] < resumed[0]["loss"], "the continued run starts where the first stopped"
    return resumed, straight, summary


def test_lora_int8_two_workers_and_a_resumed_run_replays_it_exactly(local_ray, tmp_path, tiny_model_dir, s3_storage,
                                                                   empty_cwd):
    """INT8 LoRA over two workers, with LoRA dropout and length grouping; then the same run stopped at step 8
    (its first checkpoint) and continued to 24 takes exactly its steps (same shard order, micro-batch order,
    data position, adapter, optimizer and dropout RNG). Length grouping is on, so its micro-batch order must
    replay too (the killed-worker test covers the default).

    The resumed run lives wholly in an s3:// bucket (moto): running its name again continues from the
    bucket's checkpoint, its export reloads from the bucket, and nothing lands on the local disk. It also
    streams its training split from the bucket (data.streaming=always) where the first run held it in the
    object store: a split of one row group is one window, so streaming gives the in-memory path's steps,
    to the bit, across a restart."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = [*RESUMABLE, "lora.dropout=0.1", "data.group_by_length=true"]
    config = load_config("tiny-lora", _common(tmp_path, *settings))
    summary = train(config)
    run_dir = Path(run_dir_of(config).path)
    _check_run_folder(run_dir, summary)
    assert summary.strategy["base_weight_dtype"] == "int8", "the frozen base is INT8 (bitsandbytes)"
    assert summary.strategy["trainable_parameters"] < summary.strategy["total_parameters"] / 5
    assert summary.strategy["optimizer"] == "AdamW (fused)", "torch's fused AdamW, as Trainer uses"
    assert summary.strategy["loss"] == "chunked", "the loss that never builds the full logits, by default"
    export = run_dir / "export"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in export.iterdir()}
    assert json.loads((export / "adapter_config.json").read_text())["r"] == 16
    lora_b = [t for k, t in load_file(export / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "B starts at zero: a trained adapter is non-zero"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, export)
    assert generate_text(tuned, AutoTokenizer.from_pretrained(export))

    resumed, straight, continued = _resumed_takes_the_straight_runs_steps(
        "tiny-lora", tmp_path, run_dir, settings, resumed_settings=["data.streaming=always"], storage=s3_storage)
    assert summary.train_split == "object store"
    assert continued.train_split.startswith("streamed from storage (1 row group,"), continued.train_split
    assert continued.export_dir == (open_location(s3_storage) / "resumed" / "export").uri
    from raytune_it.storage import fetch_dir

    exported = fetch_dir(open_location(continued.export_dir), "export")
    assert generate_text(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), exported),
                         AutoTokenizer.from_pretrained(exported))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
    assert [m["eval_loss"] for m in resumed if "eval_loss" in m] == [
        m["eval_loss"] for m in straight if "eval_loss" in m]
    # The schedule's length is part of the run: with a schedule that depends on it, a resume that changes
    # it is refused (a constant one, as above, may change it).
    from raytune_it.train.driver import check_schedule_kept

    def cosine(steps):
        return load_config("tiny-lora", [f"run.storage={s3_storage}", "run.name=resumed", f"train.max_steps={steps}",
                                         *settings, "train.lr_schedule=cosine"])

    check_schedule_kept(cosine(12), cosine(12), run_dir_of(cosine(12)))
    with pytest.raises(ConfigError, match=r"started for 12 steps and this config asks for 20 .*cosine"):
        check_schedule_kept(cosine(12), cosine(20), run_dir_of(cosine(12)))


def test_zero3_full_two_workers_and_a_resume_continues_it(local_ray, tmp_path, tiny_model_dir):
    """ZeRO-3 over 2 gloo workers, BF16 and checkpointing, exported consolidated; then the same run stopped at
    step 4 and continued to 12: every rank reloads its partition of parameters and optimizer states, and the
    continued losses are the uninterrupted run's. (12 steps: a ZeRO-3 step on two CPU workers costs seconds.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = [*RESUMABLE, "train.micro_batch_size=2"]
    config = load_config("tiny-full", _common(tmp_path, *settings, steps=12))
    summary = train(config)
    run_dir = Path(run_dir_of(config).path)
    _check_run_folder(run_dir, summary, steps=12)
    facts = summary.strategy
    assert facts["zero_stage"] == 3 and facts["bf16"] and facts["gradient_checkpointing"]
    assert facts["optimizer"] == "AdamW (fused)", "DeepSpeed wraps torch's fused AdamW, not its JIT-built FusedAdam"
    # ZeRO-3 partitions the parameters: each of 2 ranks holds about half
    assert facts["parameters_on_rank"] <= facts["total_parameters"] * 0.55
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    shards = sorted(p.name for p in (checkpoint / "zero").iterdir())
    assert any("zero_pp_rank_0" in n for n in shards) and any("zero_pp_rank_1" in n for n in shards), shards
    export = run_dir / "export"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    tuned = AutoModelForCausalLM.from_pretrained(export)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sum(p.numel() for p in tuned.parameters()) == facts["total_parameters"]
    changed = [not torch.allclose(a.float(), b.float(), atol=1e-3)
               for a, b in zip(tuned.state_dict().values(), base.state_dict().values())]
    assert sum(changed) > len(changed) // 2, "the consolidated export holds the trained weights"
    assert generate_text(tuned, AutoTokenizer.from_pretrained(export))

    resumed, straight, _ = _resumed_takes_the_straight_runs_steps("tiny-full", tmp_path, run_dir, settings, steps=12)
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in straight], rel=1e-6)


def test_killed_worker_resumes_from_last_checkpoint(local_ray, tmp_path):
    from ray.util.state import list_actors

    config = load_config("tiny-lora", [f"run.storage={tmp_path}", "train.max_steps=60", "train.eval_every_steps=5",
                                       "run.max_failures=2"])
    run_dir = Path(run_dir_of(config).path)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("summary", train(config)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 300
    while (latest_checkpoint_step(run_dir) or 0) < 10:
        assert time.monotonic() < deadline and runner.is_alive(), "no checkpoint at step 10"
        time.sleep(0.2)
    killed_after = latest_checkpoint_step(run_dir)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)
    runner.join(timeout=600)
    assert "summary" in outcome, "the run finished after the worker was killed"
    summary = outcome["summary"]
    assert summary.steps == 60 and summary.restarts >= 1
    history = raw_metrics(run_dir)
    restarted = [m for m in history if m["restarts"] >= 1]
    assert restarted, "steps after the kill come from a restarted worker group"
    first_after = restarted[0]
    # the step count continues from a checkpoint at or after the one committed before the kill
    assert first_after["step"] >= killed_after + 1 > 10
    # no reset to the initial loss: the restarted run picks up the trained adapter and optimizer,
    # and steps the killed group had already taken are replayed exactly
    before = {m["step"]: m["loss"] for m in history if m["restarts"] == 0}
    assert all(m["loss"] == before[m["step"]] for m in restarted if m["step"] in before)
    initial = history[0]["loss"]
    assert first_after["loss"] < initial - 0.3
    assert min(m["loss"] for m in restarted[:3]) < initial - 0.3


def test_server_type_the_cluster_lacks_fails_in_bounded_time(local_ray, tmp_path):
    config = load_config("tiny-lora", [f"run.storage={tmp_path}", "scaling.server_type=a800-80g",
                                       "scaling.placement_timeout_s=2"])
    started = time.monotonic()
    with pytest.raises(UserError, match=r"scaling.server_type=a800-80g: the cluster offers 0 of resource "
                                        r"'server_type:a800-80g'"):
        train(config)
    assert time.monotonic() - started < 120
    assert not (run_dir_of(config) / "checkpoints").exists()


def test_rerun_with_a_different_config_is_refused(tmp_path):
    first = load_config("tiny-lora", [f"run.storage={tmp_path}"])
    from raytune_it.config import save_config
    from raytune_it.train.driver import check_resume_compatible

    save_config(first, run_dir_of(first))
    check_resume_compatible(load_config("tiny-lora", [f"run.storage={tmp_path}", "train.max_steps=99"]),
                            run_dir_of(first))
    # sections training never reads may differ: how the run is evaluated, generated from or staged
    check_resume_compatible(load_config("tiny-lora", [f"run.storage={tmp_path}", "eval.max_new_tokens=8",
                                                      "generate.temperature=0.5", "e2e.latency_repeats=1"]),
                            run_dir_of(first))
    with pytest.raises(ConfigError, match=r"lora.rank: 16 -> 4.*choose another run.name"):
        check_resume_compatible(load_config("tiny-lora", [f"run.storage={tmp_path}", "lora.rank=4"]),
                                run_dir_of(first))


def test_splits_reach_the_workers_through_the_object_store_row_for_row(local_ray, tmp_path):
    """The driver puts a tokenized split in the object store a Parquet row group at a time; a worker's view
    of it has every row in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytune_it.train import data

    rows = [{"input_ids": list(range(i % 7 + 1)), "labels": [i] * (i % 7 + 1)} for i in range(10_000)]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=data.BLOCK_ROWS)
    split = data.put_split([local(path)])
    assert split.rows == 10_000 and len(split.blocks) == 3
    assert split.table().to_pylist() == rows


def test_a_chat_run_counts_every_real_token_when_the_pad_token_is_eos_and_exports_its_template(local_ray, tmp_path,
                                                                                                tiny_model_dir):
    """messages data with a named template, on two workers, with a LLaMA-style tokenizer that ships without a
    pad token (raytune-it pads with EOS, as transformers' recipes do):

    - it trains like any run, and the export's tokenizer (what serve loads) renders chat with the template
      the run trained with;
    - tokens are counted from each row's length, so every EOS still counts: the run's total is exactly the
      lengths of the rows its steps consumed, in the epoch's order."""
    import shutil

    import pyarrow.parquet as pq

    from raytune_it.data.chat import CHAT_TEMPLATES
    from raytune_it.models.loading import load_tokenizer
    from raytune_it.train.data import epoch_rows
    from raytune_it.train.prepared import recorded_dataset

    model = tmp_path / "llama-style"
    shutil.copytree(tiny_model_dir, model)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    turns = [{"role": "user", "content": "Convert 2 hours to minutes."},
             {"role": "assistant", "content": "2 hours is 120 minutes."}]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [dict(turns[0], content=f"Convert {n} hours to minutes."),
                                                     dict(turns[1], content=f"{n} hours is {60 * n} minutes.")]})
                            + "\n" for n in range(1, 41)))
    config = load_config("tiny-lora", [f"run.storage={tmp_path}", f"model.name_or_path={model}", f"data.path={data}",
                                       "data.format=messages", "data.template=chatml", "lora.quantization=none",
                                       "scaling.num_workers=2", "train.micro_batch_size=4", "train.max_steps=3",
                                       "train.eval_every_steps=3"])
    summary = train(config)
    assert summary.steps == 3 and summary.final_eval_loss is not None
    run_dir = tmp_path / "tiny-lora"
    assert load_tokenizer(str(run_dir / "export")).chat_template == CHAT_TEMPLATES["chatml"]
    [train_file] = recorded_dataset(config, local(run_dir)).files("train")
    lengths = [len(ids) for ids in pq.read_table(train_file.path).column("input_ids").to_pylist()]
    consumed = [int(i) for rank in range(2) for i in epoch_rows(len(lengths), config.train.seed, 0, rank, 2)[:3 * 4]]
    assert summary.train_tokens == sum(lengths[i] for i in consumed)


def test_lora_on_an_nf4_base_trains_on_the_cpu_and_exports_a_peft_adapter(local_ray, tmp_path, tiny_model_dir):
    """lora.quantization=nf4: bitsandbytes' 4-bit NormalFloat base with double quantization (QLoRA), here on
    bitsandbytes' CPU backend; the adapter reloads on a 16-bit base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = load_config("tiny-lora", [f"run.storage={tmp_path}", "lora.quantization=nf4", "scaling.num_workers=1",
                                       "train.max_steps=4", "train.eval_every_steps=4"])
    summary = train(config)
    assert summary.strategy["quantization"] == "nf4" and summary.strategy["base_weight_dtype"] == "uint8"
    history = raw_metrics(tmp_path / "tiny-lora")
    assert history[-1]["loss"] < history[0]["loss"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "tiny-lora" / "export")
