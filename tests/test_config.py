import json
import sys

import pytest
import yaml

from raytune_it.config import JobConfig, load_config, load_run_config, preset_names, save_config
from raytune_it.errors import ConfigError

SURVEY_SIZES = ("7b", "13b", "30b", "65b")


def test_defaults_and_overrides_with_yaml_values():
    config = load_config("tiny-lora", ["lora.rank=32", "train.micro_batch_size=8",
                                       "lora.target_modules=[q_proj, v_proj]", "data.packing=true"])
    assert config.lora.rank == 32
    assert config.train.micro_batch_size == 8
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.packing is True
    # survey defaults
    plain = load_config(None)
    assert (plain.lora.rank, plain.lora.quantization, plain.train.epochs, plain.train.max_seq_len) == (
        16, "int8", 3, 512)
    assert (plain.deepspeed.zero_stage, plain.deepspeed.bf16, plain.deepspeed.gradient_checkpointing) == (3, True, True)


def test_later_override_wins_and_data_path_file(tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text('[{"instruction": "a", "input": "", "output": "b"}]')
    config = load_config("tiny-full", ["train.seed=1", "train.seed=7", f"data.path={data}"])
    assert config.train.seed == 7 and config.data.path == str(data)


def test_every_preset_loads_and_validates():
    names = preset_names()
    expected = {"tiny-lora", "tiny-full", "tiny-sweep"} | {
        f"llama-{s}-{kind}" for s in SURVEY_SIZES for kind in ("full-a800", "lora-int8")}
    assert expected <= set(names)
    for name in names:
        config = load_config(name, ["model.name_or_path=tiny-llama", "data.path=builtin:tasks"])
        assert isinstance(config, JobConfig)
        assert config.run.name


@pytest.mark.parametrize("size,gpus,batch", [("7b", 2, 8), ("13b", 4, 8), ("30b", 8, 4), ("65b", 16, 2)])
def test_survey_full_presets_match_table_8(size, gpus, batch):
    config = load_config(f"llama-{size}-full-a800", ["model.name_or_path=tiny-llama", "data.path=builtin:tasks"])
    assert config.method == "full" and config.deepspeed.zero_stage == 3 and config.deepspeed.bf16
    assert config.deepspeed.gradient_checkpointing and config.train.epochs == 3 and config.train.max_seq_len == 512
    assert (config.scaling.num_workers, config.train.micro_batch_size) == (gpus, batch)
    assert config.scaling.server_type == "a800-80g" and config.scaling.use_gpu
    lora = load_config(f"llama-{size}-lora-int8", ["model.name_or_path=tiny-llama", "data.path=builtin:tasks"])
    assert lora.method == "lora" and lora.lora.quantization == "int8" and lora.lora.rank == 16


def test_survey_preset_names_the_values_the_user_must_supply():
    with pytest.raises(ConfigError) as err:
        load_config("llama-7b-full-a800")
    assert "model.name_or_path: required" in str(err.value) and "data.path: required" in str(err.value)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("lora.rnak=8", "lora.rnak: unknown key. Did you mean 'lora.rank'?"),
        ("bogus.key=1", "bogus: unknown key"),
        ("train.micro_batch_size=abc", "train.micro_batch_size: got 'abc'"),
        ("lora.rank=0", "lora.rank: got 0; input should be greater than or equal to 1"),
        ("train.max_seq_len=-1", "train.max_seq_len: got -1"),
        ("method=ful", "method: got 'ful'; input should be 'full' or 'lora'"),
        ("scaling.server_type=h100",
         "scaling.server_type: got 'h100'; input should be 'a800-80g', 'rtx3090-24g' or 'any'"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage: got 4"),
        ("data.eval_fraction=0.9", "data.eval_fraction: got 0.9; input should be less than or equal to 0.5"),
        ("run.name=../../etc", "run.name: got '../../etc'"),
        ("lora.target_modules=[]", "lora.target_modules: got []"),
        # Strict types: a boolean or a float is never taken for a count, nor a number for a switch.
        ("lora.rank=true", "lora.rank: got True; input should be a valid integer"),
        ("train.max_steps=1.0", "train.max_steps: got 1.0; input should be a valid integer"),
        ("train.learning_rate=true", "train.learning_rate: got True; value error, a number is required"),
        ("lora.merge=1", "lora.merge: got 1; input should be a valid boolean"),
        # A key that was replaced says by what.
        ("lora.int8=false", "lora.int8: got False; value error, lora.int8 was replaced by lora.quantization: use "
                            "lora.quantization=none"),
        ("lora.quantization=nf8", "lora.quantization: got 'nf8'; input should be 'int8', 'nf4' or 'none'"),
        ("train.learning_rate=.nan", "train.learning_rate: got nan"),
        # A rule across sections names its keys, not the whole config.
        ("generate.max_new_tokens=4096", "\n  generate.max_new_tokens=4096 leaves no room for a prompt in "
                                         "serve.max_model_len=2048; set generate.max_new_tokens below 2048"),
        ("eval.max_new_tokens=2048", "\n  eval.max_new_tokens=2048 leaves no room"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, needle):
    """Each refused before Ray starts, naming the key, the value and what is allowed."""
    with pytest.raises(ConfigError) as err:
        load_config("tiny-lora", [override])
    assert needle in str(err.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as err:
        load_config("tiny-lorra")
    message = str(err.value)
    assert "unknown preset 'tiny-lorra'" in message and "Did you mean 'tiny-lora'?" in message
    assert "llama-65b-full-a800" in message


def test_missing_paths_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path: '/no/such/alpaca.json' does not exist"):
        load_config("tiny-lora", ["data.path=/no/such/alpaca.json"])
    with pytest.raises(ConfigError, match=r"model.name_or_path: '/no/such/llama' does not exist"):
        load_config("tiny-lora", ["model.name_or_path=/no/such/llama"])
    with pytest.raises(ConfigError, match=r"is not a Hugging Face model folder .*: it has no config.json"):
        load_config("tiny-lora", [f"model.name_or_path={tmp_path}"])
    with pytest.raises(ConfigError, match="unknown built-in dataset"):
        load_config("tiny-lora", ["data.path=builtin:nope"])
    # a hub id is accepted without a local directory (it is fetched where a hub is reachable)
    assert load_config("tiny-lora", ["model.name_or_path=meta-llama/Llama-2-7b-hf"]).model.name_or_path


def test_malformed_override_and_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config("tiny-lora", ["lora.rank"])
    with pytest.raises(ConfigError, match="lora.rank.x: lora.rank is a value"):
        load_config("tiny-lora", ["lora.rank.x=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    deep = tmp_path / "deep.yaml"  # nesting that recurses past Python's limit in the YAML parser
    deep.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: its mappings and lists nest hundreds of levels deep"):
        load_config(str(deep))
    with pytest.raises(ConfigError, match="override data.path: .* nest hundreds of levels deep"):
        load_config("tiny-lora", ["data.path=" + "[" * 5000])


def test_yaml_file_round_trip_through_config_yaml(tmp_path):
    source = tmp_path / "job.yaml"
    source.write_text(yaml.safe_dump({"method": "full", "train": {"max_steps": 5}, "run": {"name": "rt"}}))
    config = load_config(str(source), ["deepspeed.offload_optimizer=true"])
    written = save_config(config, tmp_path / "runs" / config.run.name)
    assert written.name == "config.yaml"
    assert load_run_config(written) == config


def test_tune_and_serve_sections_exist_and_forbid_unknown_keys():
    config = load_config("tiny-sweep")
    assert config.tune is not None and config.serve is not None
    with pytest.raises(ConfigError, match="tune.foo: unknown key"):
        load_config("tiny-sweep", ["tune.foo=1"])


def test_loading_a_config_does_not_import_ray():
    # Validation happens on the driver before Ray starts: it must not even need Ray.
    import subprocess

    code = ("import sys, raytune_it; raytune_it.load_config('tiny-lora', ['lora.rank=8']); "
            "print('ray' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_secrets_never_reach_saved_or_printed_configs(tmp_path):
    config = load_config("tiny-lora", ["serve.api_key=s3cret-key-123"])
    assert config.serve.api_key == "s3cret-key-123"
    assert "s3cret" not in config.to_yaml() and "s3cret" not in json.dumps(config.to_dict())
    saved = save_config(config, tmp_path)
    assert "s3cret" not in saved.read_text()
    assert load_run_config(saved).serve.api_key is None, "serving a saved config sets no key nobody chose"
    with pytest.raises(ConfigError, match="placeholder"):
        load_config("tiny-lora", ["serve.api_key=<redacted>"])


@pytest.mark.parametrize("host", ["not a host!", "", "-bad.example", "a..b", "x" * 64, "http://127.0.0.1",
                                  "1.2.3.4:80"])
def test_serve_host_must_be_an_address_or_a_hostname(host):
    with pytest.raises(ConfigError, match="serve.host"):
        load_config("tiny-lora", [f"serve.host={host}"])


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "fd00::1", "::1", "localhost", "serve-1.internal.example"])
def test_serve_host_takes_addresses_and_hostnames(host):
    assert load_config("tiny-lora", [f"serve.host={host}"]).serve.host == host


def test_with_overrides_is_the_one_way_to_derive_a_config():
    from raytune_it.config.loading import with_overrides

    base = load_config("tiny-lora", ["serve.api_key=s3cret-key"])
    derived = with_overrides(base, {"train.max_steps": 8, "lora.rank": 4, "tune": {}})
    assert (derived.train.max_steps, derived.lora.rank) == (8, 4)
    assert base.train.max_steps != 8 and base.lora.rank == 16, "the original is left as it was"
    assert derived.serve.api_key == "s3cret-key", "a derived job serves with the key the user set"
    assert with_overrides(base, ["train.max_steps=8", "lora.rank=4"]) == with_overrides(
        base, {"train.max_steps": 8, "lora.rank": 4})
    with pytest.raises(ConfigError, match=r"lora.rank: got 0"):
        with_overrides(base, {"lora.rank": 0}, "a trial")


def test_a_model_folder_that_cannot_load_is_refused_before_ray_naming_what_it_lacks(tmp_path, tiny_model_dir):
    """Not a tokenizer error from a Ray Data actor or a replica: each broken copy of a real model folder is
    refused by load_config, for the base model and for generate's and eval's models."""
    import re
    import shutil

    def broken(name, drop=(), config=None):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        for file in drop:
            (folder / file).unlink()
        if config is not None:
            (folder / "config.json").write_text(config)
        return folder

    cases = {
        broken("no-weights", drop=["model.safetensors"]): "no *.safetensors weights",
        broken("no-tokenizer", drop=["tokenizer.json", "tokenizer_config.json"]): "no tokenizer files",
        broken("bad-json", config="{"): "config.json that is not valid JSON",
        broken("no-type", config="{}"): "config.json without a model_type",
    }
    for folder, problem in cases.items():
        for key in ("model.name_or_path", "generate.models.x", "eval.models.x"):
            override = f"{key}={folder}" if key.startswith("model") else f"{key.rsplit('.', 1)[0]}={{x: {folder}}}"
            with pytest.raises(ConfigError, match=f"{key}: '{folder}' .*{re.escape(problem)}"):
                load_config("tiny-lora", [override])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a peft adapter folder, not a model"):
        load_config("tiny-lora", [f"model.name_or_path={adapter}"])
    with pytest.raises(ConfigError, match="has no adapter_model.safetensors"):
        load_config("tiny-lora", [f"generate.models={{x: {adapter}}}"])
    load_config("tiny-lora", [f"model.name_or_path={tiny_model_dir}"])
