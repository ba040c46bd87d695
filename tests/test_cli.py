import json
import subprocess
import sys

import yaml

from raytune_it.config import load_config


def run(*args, check=False):
    return subprocess.run([sys.executable, "-m", "raytune_it", *args], capture_output=True, text=True, check=check)


def test_console_script_and_module_are_the_same_cli():
    from pathlib import Path

    script = Path(sys.executable).with_name("raytune-it")
    assert script.is_file(), "the raytune-it console script is installed beside the interpreter"
    via_script = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    assert via_script == run("--help", check=True).stdout
    for words in (["config", "show", "--help"], ["data", "inspect", "--help"], ["data", "generate", "--help"]):
        text = run(*words, check=True).stdout
        assert "KEY=VALUE" in text or "--records" in text


def test_config_show_prints_the_resolved_config():
    out = run("config", "show", "tiny-lora", "lora.rank=8", "train.max_steps=3", check=True).stdout
    shown = yaml.safe_load(out)
    assert shown["lora"]["rank"] == 8 and shown["train"]["max_steps"] == 3
    assert shown == load_config("tiny-lora", ["lora.rank=8", "train.max_steps=3"]).to_dict()


def test_bad_config_exits_nonzero_with_the_key_and_no_traceback():
    result = run("config", "show", "tiny-lora", "lora.rank=0", "train.max_seq_len=-1")
    assert result.returncode == 2
    assert "lora.rank: got 0" in result.stderr and "train.max_seq_len: got -1" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("data", "inspect", "no-such-preset")
    assert result.returncode == 2 and "unknown preset 'no-such-preset'" in result.stderr


def test_serve_names_a_missing_model_or_adapter_before_ray_starts(tmp_path):
    import json

    env_free = {"RAY_ADDRESS": ""}
    for overrides, needle in [
        (["serve.base_model=/no/such/model"], "serve.base_model: '/no/such/model' does not exist"),
        ([f"serve.adapters={json.dumps({'med': str(tmp_path / 'nope')})}"], "serve.adapters.med:"),
        ([f"serve.adapter_root={tmp_path / 'none'}"], "serve.adapter_root:"),
    ]:
        result = subprocess.run([sys.executable, "-m", "raytune_it", "serve", "tiny-lora", *overrides],
                                capture_output=True, text=True, env={**__import__("os").environ, **env_free})
        assert result.returncode == 2, result.stderr[-2000:]
        assert needle in result.stderr and "Traceback" not in result.stderr
        assert "Ray instance" not in result.stderr + result.stdout, "refused before Ray started"


def test_data_inspect_shows_stats_and_the_two_spans(tmp_path):
    result = run("data", "inspect", "tiny-lora", "data.builtin_records=200", check=True)
    out = result.stdout
    assert "records" in out and "200" in out and "truncated at max_seq_len=512" in out
    assert out.count("masked from the loss (labels = -100)") == 1 and out.count("── trained: ") == 1
    assert "### Instruction:" in out and "</s>" in out
    # A conversation shows every span: masked system and user turns, each assistant turn trained.
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 hours in minutes?"},
        {"role": "assistant", "content": "120."}, {"role": "user", "content": "And 3?"},
        {"role": "assistant", "content": "180."}]}) + "\n")
    out = run("data", "inspect", "tiny-lora", f"data.path={chat}", "data.format=messages", "data.template=chatml",
              "data.eval_fraction=0", check=True).stdout
    assert out.count("── trained: ") == 2 and out.count("masked from the loss") == 2
    assert "<|im_start|>user" in out
    stats = yaml.safe_load(run("data", "inspect", "tiny-lora", "data.builtin_records=200", "--json",
                               check=True).stdout)
    assert stats["records"] == 200 and stats["train_records"] + stats["eval_records"] == 200


def test_data_inspect_on_a_bad_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a"}\n')
    result = run("data", "inspect", "tiny-lora", f"data.path={path}")
    assert result.returncode == 2 and f"{path}:2: missing field 'output'" in result.stderr
    assert "Traceback" not in result.stderr
    ok = run("data", "inspect", "tiny-lora", f"data.path={path}", "data.skip_bad_records=true", "--json", check=True)
    assert yaml.safe_load(ok.stdout)["bad_records_skipped"] == 1


def test_data_generate_writes_deterministic_jsonl(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run("data", "generate", str(a), "--records", "50", "--seed", "3", check=True)
    run("data", "generate", str(b), "--records", "50", "--seed", "3", check=True)
    assert a.read_text() == b.read_text() and len(a.read_text().splitlines()) == 50
    bad = run("data", "generate", str(a), "--families", "nope")
    assert bad.returncode == 2 and "unknown nope" in bad.stderr


def test_data_generate_refuses_an_output_it_cannot_write_and_leaves_nothing_behind(tmp_path, capsys):
    """A folder, a name data.path cannot read back, a parent that is a file, an empty family list: one
    error each, not a traceback from a rename, and no staging file left beside the target."""
    from raytune_it.cli import main

    (tmp_path / "a-file").write_text("")
    (tmp_path / "folder.jsonl").mkdir()
    cases = {
        str(tmp_path): "is not a JSON Lines file name",
        str(tmp_path / "tasks.txt"): "end it with .jsonl or .ndjson",
        str(tmp_path / "folder.jsonl"): "is a folder",
        str(tmp_path / "a-file" / "x.jsonl"): "output: cannot write",
    }
    for output, message in cases.items():
        assert main(["data", "generate", output, "--records", "3"]) == 2
        assert message in capsys.readouterr().err
    assert main(["data", "generate", str(tmp_path / "x.jsonl"), "--families", ","]) == 2
    assert "--families: names no family" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder.jsonl"]
    assert main(["data", "generate", f"file://{tmp_path}/ok.jsonl", "--records", "3", "--families", "bmi, dosage"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ok.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {row["family"] for row in rows} <= {"bmi", "dosage"}


def test_every_command_refuses_storage_it_cannot_write_before_any_work(tmp_path):
    """Not a traceback from a mkdir, nor a Ray Data actor's failed block, nor an error after training eval's
    adapters: each names the key, before Ray starts."""
    import io

    import pytest
    import ray
    from rich.console import Console

    from raytune_it.errors import ConfigError
    from raytune_it.evaluation.driver import evaluate
    from raytune_it.generation.offline import generate
    from raytune_it.models.loading import load_tokenizer
    from raytune_it.train.prepared import prepare

    (tmp_path / "a-file").write_text("")
    unwritable = tmp_path / "a-file" / "under-it"
    records = tmp_path / "one.jsonl"
    records.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    config = load_config("tiny-lora", [f"data.path={records}", f"data.prepared_root={unwritable}"])
    with pytest.raises(ConfigError, match=f"data.prepared_root: cannot create '{unwritable}'"):
        prepare(config, load_tokenizer(config.model.name_or_path))
    for command in (generate, evaluate):
        shown = io.StringIO()
        with pytest.raises(ConfigError, match=f"run.storage: cannot create '{unwritable}"):
            command(load_config("tiny-lora", [f"data.path={records}", f"run.storage={unwritable}"]),
                    console=Console(file=shown))
        assert shown.getvalue() == "", "nothing was started (eval trained its general adapter first)"
    assert not ray.is_initialized()


def test_bench_serve_against_no_endpoint_is_one_clear_error():
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run("bench-serve", "--url", f"http://127.0.0.1:{port}", "--model", "tiny-llama", "-n", "2")
    assert result.returncode == 2 and "cannot reach the endpoint" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_every_count_flag_refuses_zero_negative_and_nan_by_name(capsys):
    import pytest

    from raytune_it.cli import main

    for words in (["plan", "7B", "--seq-len", "0"], ["plan", "7B", "--records", "-1"],
                  ["plan", "7B", "--epochs", "nan"], ["plan", "7B", "--global-batch", "0"],
                  ["bench-serve", "--model", "m", "--concurrency", "0"],
                  ["data", "generate", "out.jsonl", "--records", "0"]):
        with pytest.raises(SystemExit) as exited:
            main(words)
        assert exited.value.code == 2
        assert f"argument {words[-2]}: '{words[-1]}': give a number above 0" in capsys.readouterr().err, words


def test_an_unknown_flag_is_reported_by_the_command_it_was_given_to(capsys):
    import pytest

    from raytune_it.cli import main

    for argv, prog in ((["data", "generate", "x.jsonl", "-o", "y"], "raytune-it data generate"),
                       (["plan", "7B", "--bogus"], "raytune-it plan")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"usage: {prog} " in err and f"{prog}: error: unrecognized arguments" in err
