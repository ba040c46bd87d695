"""The ``raytune-it`` command line: thin subcommands over the package.

The CLI holds no logic: it parses arguments, loads the config, calls one function
and prints. A :class:`UserError` is printed as one clear message (exit 2), never
as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from raytune_it.errors import UserError
from raytune_it.hardware import SERVER_TYPES

CONFIG_HELP = ("a bundled preset name (see 'raytune-it config presets') or the path of a YAML job config; "
               "omitted: the defaults")
OVERRIDES_HELP = ("dotted overrides with YAML values, applied in order, e.g. lora.rank=32 "
                  "train.micro_batch_size=8 data.path=/data/alpaca.json 'lora.target_modules=[q_proj,v_proj]'")


def _add_config_args(parser: argparse.ArgumentParser, required: bool = True, default: str | None = None) -> None:
    help_text = CONFIG_HELP if default is None else CONFIG_HELP.replace("omitted: the defaults", f"omitted: {default}")
    parser.add_argument("config", nargs=None if required else "?", default=default, metavar="CONFIG", help=help_text)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    parser.set_defaults(default_config=default)


def _load(args: argparse.Namespace):
    from raytune_it.config import load_config
    from raytune_it.storage import is_uri

    # `COMMAND key=value ...`: overrides of the default config (a storage URI's query has '=' too)
    if args.config and "=" in args.config and not is_uri(args.config):
        args.overrides, args.config = [args.config, *args.overrides], args.default_config
    return load_config(args.config, args.overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    config = _load(args)
    print(json.dumps(config.to_dict(), indent=2) if args.json else config.to_yaml(), end="" if not args.json else "\n")
    return 0


def cmd_config_presets(args: argparse.Namespace) -> int:
    from raytune_it.config import preset_names

    for name in preset_names():
        print(name)
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from raytune_it.data.inspect import inspect_dataset

    inspect_dataset(_load(args), as_json=args.json)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from raytune_it.train.prepared import prepare_ahead

    prepare_ahead(_load(args), as_json=args.json)
    return 0


def cmd_data_generate(args: argparse.Namespace) -> int:
    from raytune_it.config.paths import SUFFIX_TYPES
    from raytune_it.data.synthetic import FAMILIES, generate, write_jsonl
    from raytune_it.storage import redact_uri

    families = None
    if args.families is not None:
        families = [name.strip() for name in args.families.split(",") if name.strip()]
        known = sorted(f.name for f in FAMILIES)
        unknown = sorted(set(families) - set(known))
        if unknown or not families:
            problem = f"unknown {', '.join(unknown)}" if unknown else "names no family"
            raise UserError(f"--families: {problem}; known: {', '.join(known)}")
    jsonl = sorted(suffix for suffix, kind in SUFFIX_TYPES.items() if kind == "jsonl")
    if not args.output.lower().endswith(tuple(jsonl)):
        raise UserError(f"output: {redact_uri(args.output)!r} is not a JSON Lines file name; end it with "
                        f"{' or '.join(jsonl)} so that data.path reads it back")
    output = write_jsonl(generate(args.records, seed=args.seed, families=families), args.output)
    print(f"wrote {args.records} records to {redact_uri(output.uri)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raytune_it.train.driver import train

    train(_load(args))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from raytune_it.tune.sweep import sweep

    sweep(_load(args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from raytune_it.serving.run import serve_forever

    serve_forever(_load(args))
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from raytune_it.serving.bench_client import bench

    numbers = bench(args.url, args.model, args.n, args.prompt, args.max_tokens, args.concurrency, args.api_key)
    if args.json:
        print(json.dumps(numbers, indent=2))
        return 0 if not numbers["errors"] else 1
    table = Table(title=f"{args.url} model {args.model}: {args.n} requests, concurrency {args.concurrency}",
                  show_header=False)
    for key, value in numbers.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    return 0 if not numbers["errors"] else 1


def cmd_run(args: argparse.Namespace) -> int:
    from raytune_it.endtoend.stages import run_all

    run_all(_load(args))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from raytune_it.endtoend.report import write_report

    for path in write_report(args.run_dir):
        print(path.uri)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from raytune_it.evaluation.driver import evaluate

    evaluate(_load(args))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from raytune_it.generation.offline import generate

    generate(_load(args))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rich.console import Console

    from raytune_it.plan.inputs import resolve_workload
    from raytune_it.plan.planner import (
        ENGINE_BANDWIDTH_EFFICIENCY,
        calibrate,
        measured_engine_efficiency,
        measured_throughput,
        plan,
    )
    from raytune_it.plan.render import (
        QUANTIZATION_COLUMNS,
        print_plan,
        print_quantization_table,
        print_survey_table,
        quantization_rows,
        survey_markdown,
        survey_table,
    )
    from raytune_it.storage import redact_uri, write_named_file

    # Piped output gets room for the wide table instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 180)
    if args.markdown and not args.table:
        raise UserError("--markdown writes the survey table: add --table")
    if args.table:
        options = {key: value for key, value in (("seq_len", args.seq_len), ("epochs", args.epochs),
                                                 ("records", args.records), ("mean_tokens", args.mean_tokens),
                                                 ("global_batch", args.global_batch)) if value is not None}
        if args.calibrate:
            options["sustained_flops"], options["calibrated_from"] = measured_throughput(args.calibrate)
        plans = survey_table(**options)
        if args.json:
            print(json.dumps([p.to_dict() for p in plans], indent=2))
        else:
            print_survey_table(plans, console)
        if args.markdown:
            written = write_named_file(args.markdown, "--markdown", [survey_markdown(plans).encode("utf-8")])
            console.print(f"wrote {redact_uri(written.uri)}", markup=False, highlight=False)
        return 0
    workload = resolve_workload(args.target, args.overrides, method=args.method, server_type=args.server_type,
                                seq_len=args.seq_len, records=args.records, mean_tokens=args.mean_tokens,
                                data=args.data, tokenizer=args.tokenizer, epochs=args.epochs,
                                global_batch=args.global_batch, lora_targets=args.lora_targets)
    if args.calibrate:
        workload = calibrate(workload, args.calibrate)
    if args.calibrate_inference:
        efficiency, source = measured_engine_efficiency(args.calibrate_inference)
        workload = replace(workload, engine_efficiency={**ENGINE_BANDWIDTH_EFFICIENCY, **efficiency},
                           inference_calibrated_from=source)
    result = plan(workload)
    if args.json:
        data = result.to_dict()
        if workload.method == "lora":
            data["quantization_comparison"] = [dict(zip(QUANTIZATION_COLUMNS, row))
                                               for row in quantization_rows(workload)]
        print(json.dumps(data, indent=2))
    else:
        print_plan(result, console)
        if workload.method == "lora":
            print_quantization_table(workload, console)
    return 0


def cmd_node_resources(args: argparse.Namespace) -> int:
    from raytune_it.hardware import local_gpu_names, node_resources

    names = args.gpu_name or local_gpu_names()
    print(json.dumps(node_resources(names)))
    return 0


def cmd_model_tiny(args: argparse.Namespace) -> int:
    from raytune_it.models.tiny import ensure_tiny_model

    print(ensure_tiny_model())
    return 0


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type for a count or a size: a number above zero, or argparse's usage error naming the flag
    (not a ZeroDivisionError from the planner, or a plan for -1 records)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raytune-it",
        description="Instruction-tune LLaMA-family models on Ray (DeepSpeed ZeRO-3 full tuning or INT8 LoRA) "
        "and serve the tuned models. Every job is one validated config: a preset or YAML file plus "
        "dotted overrides.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = sub.add_parser("config", help="show and list job configs").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    show = config.add_parser("show", help="print the fully resolved, validated job config",
                             description="Load CONFIG, apply the overrides, validate, and print the result.")
    _add_config_args(show, required=False)
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=cmd_config_show)
    presets = config.add_parser("presets", help="list the bundled presets")
    presets.set_defaults(func=cmd_config_presets)

    data = sub.add_parser("data", help="inspect or generate instruction data").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    inspect = data.add_parser(
        "inspect", help="dataset statistics and the first example as the model sees it",
        description="Stream the configured dataset once: records, tokens, mean and max length, truncation at "
        "train.max_seq_len, bad records skipped; then show the first training example with the masked "
        "prompt span and the trained response span.")
    _add_config_args(inspect, required=False)
    inspect.add_argument("--json", action="store_true", help="print the statistics as JSON only")
    inspect.set_defaults(func=cmd_data_inspect)
    prepare = data.add_parser(
        "prepare", help="tokenize the dataset once into storage, shared by the runs and sweeps of the same data",
        description="Tokenize the configured dataset (render, mask, truncate, pack, split) into "
        "data.prepared_root (default run.storage/_prepared), under a key of what decides its rows: the data files "
        "and their sizes and times, format, template, tokenizer, train.max_seq_len, packing and the split. "
        "Print the key and the statistics. A run, sweep trial or re-run of the same data finds it there and "
        "tokenizes nothing; a dataset already prepared is only read back.")
    _add_config_args(prepare, required=False)
    prepare.add_argument("--json", action="store_true", help="print the key, folder and statistics as JSON only")
    prepare.set_defaults(func=cmd_data_prepare)
    gen = data.add_parser("generate", help="write the project's generated instruction data to a JSONL file",
                          description="Deterministic, seeded Alpaca records from task families in the "
                          "medicine, law, finance and general domains.")
    gen.add_argument("output", help="the .jsonl file to write: a local path or a storage URI (s3://bucket/tasks.jsonl)")
    gen.add_argument("--records", type=positive(int), default=2000, help="how many records (default: 2000)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    gen.add_argument("--families", help="comma-separated task families to include (default: all)")
    gen.set_defaults(func=cmd_data_generate)

    train = sub.add_parser(
        "train", help="run (or resume) a Ray Train tuning job: ZeRO-3 full tuning or LoRA",
        description="Run a Ray Train TorchTrainer on the cluster in RAY_ADDRESS, or on a local Ray started for "
        "the run. Outputs go to run.storage/run.name/: config.yaml, metrics.jsonl, checkpoints/, summary.json "
        "and export/ (a Hugging Face model directory for method=full, a peft adapter for method=lora). "
        "Running again with the same run.name resumes from the latest checkpoint. With tracking.backend=mlflow "
        "or wandb the run is also logged there (tracking.uri, tracking.experiment).")
    _add_config_args(train)
    train.set_defaults(func=cmd_train)

    sweep = sub.add_parser(
        "sweep", help="sweep LoRA rank, batch size or any config path with Ray Tune (ASHA early stopping)",
        description="Run one Ray Train job per trial under Ray Tune. The search space is tune.search_space: config "
        "paths mapped to lists of values or distributions, e.g. 'tune.search_space={\"lora.rank\": [4, 16], "
        "\"train.micro_batch_size\": [1, 2]}'. Every trial is validated before any starts; combinations "
        "estimated not to fit in memory are skipped. Outputs in run.storage/run.name/: results.csv, "
        "results.parquet, plots and best/ (the best adapter and its config.yaml). Re-running the same name "
        "resumes an interrupted sweep. With tracking.backend set, the sweep is a tracked run and each trial a "
        "run under it.")
    _add_config_args(sweep)
    sweep.set_defaults(func=cmd_sweep)

    serve = sub.add_parser(
        "serve", help="serve the base model and its adapters with Ray Serve (OpenAI-compatible HTTP)",
        description="Deploy a Ray Serve application on the cluster in RAY_ADDRESS, or on a local Ray, from the "
        "config's serve section (serve.base_model, serve.adapters, serve.host, serve.port, serve.api_key, ...). "
        "Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/latency, /metrics. Serves until Ctrl-C.")
    _add_config_args(serve)
    serve.set_defaults(func=cmd_serve)

    bench_serve = sub.add_parser(
        "bench-serve", help="measure a running endpoint from outside: latency, time to first token, tokens/s",
        description="Send N streamed completions and report p50/p95 latency and time to first token, the "
        "generation rate seen by the client and reported by the server, and errors.")
    bench_serve.add_argument("--url", default="http://127.0.0.1:8000", help="endpoint base URL (default: %(default)s)")
    bench_serve.add_argument("--model", required=True, help="model or adapter name to query")
    bench_serve.add_argument("-n", type=positive(int), default=20, help="number of requests (default: %(default)s)")
    bench_serve.add_argument("--max-tokens", type=positive(int), default=64,
                             help="max_tokens per request (default: %(default)s)")
    bench_serve.add_argument("--prompt", default="### Instruction:\nConvert 5 kilometers to meters.\n\n### Response:\n",
                             help="prompt text")
    bench_serve.add_argument("--concurrency", type=positive(int), default=1,
                             help="requests in flight (default: 1, batch size 1)")
    bench_serve.add_argument("--api-key", default=None, help="API key, if the endpoint has one")
    bench_serve.add_argument("--json", action="store_true", help="print JSON")
    bench_serve.set_defaults(func=cmd_bench_serve)

    run = sub.add_parser(
        "run", help="the whole service end to end: stats + plan, LoRA sweep, ZeRO-3 run, serve, eval, report",
        description="Print the dataset statistics and the planner's estimate; sweep LoRA rank x per-device batch "
        "with Ray Tune and keep the best adapter; run ZeRO-3 full tuning on the same data (e2e.full_overrides); "
        "serve the base model, the best adapter and the full model with Ray Serve and time each at batch 1 through "
        "POST /v1/latency; evaluate the three effects of instruction tuning; write report.md and report.html in "
        "run.storage/run.name. Uses the Ray cluster in RAY_ADDRESS, or starts a local one and stops it. "
        "Default config: tiny-run (a few minutes on a laptop CPU).")
    _add_config_args(run, required=False, default="tiny-run")
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="rebuild report.md / report.html from a finished run's files",
                            description="Re-render the report of a finished 'raytune-it run' from the files it "
                            "wrote (summary.json files, sweep results, serve.json, eval.json); runs nothing.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run folder: run.storage/run.name, a local path "
                        "or a storage URI (s3://bucket/prefix/tiny-run)")
    report.set_defaults(func=cmd_report)

    evaluation = sub.add_parser(
        "eval", help="measure the three effects of instruction tuning on held-out task families",
        description="Score the base model and tuned models on held-out examples of the generated task families, "
        "or of your own file's families (eval.data.path, eval.family_field, e.g. Dolly's category), with exact "
        "match, token F1 and ROUGE-L per family, and report: performance (general adapter vs base on tuned "
        "families), task generalization (the same on eval.held_out_families, never tuned on) and domain "
        "specialization (the eval.domain adapter vs the general one on eval.domain_families). Adapters not "
        "named in eval.models are trained first with 'raytune-it train' (eval.train_steps each). Answers come "
        "from the serving engines in batches (serve.engine, eval.batch_size), each model in the prompt format "
        "it was tuned with; eval.judge adds pairwise win rates from a judge model. Results: "
        "run.storage/run.name/eval/eval.json.")
    _add_config_args(evaluation, required=False)
    evaluation.set_defaults(func=cmd_eval)

    generation = sub.add_parser(
        "generate", help="offline batch inference: models over a dataset on Ray Data, rows to storage",
        description="Run the base model, adapters or full exports (generate.models) over data.path (alpaca, "
        "messages, sharegpt or prompt records; JSON, JSONL or Parquet; a path or storage URI) with an actor pool "
        "of engine replicas (generate.num_actors, serve.engine), and write one row per input and model (id, "
        "prompt, completion, token counts, finish_reason) to run.storage/run.name/generations/<model>/, a file per "
        "block of generate.block_rows rows. A re-run of the same job skips the blocks already written; a changed "
        "one is refused, naming what changed. Example: raytune-it "
        "generate tiny-lora data.path=prompts.jsonl data.format=prompt 'generate.models={adapter: runs/x/export}'")
    _add_config_args(generation)
    generation.set_defaults(func=cmd_generate)

    plan = sub.add_parser(
        "plan", help="size a tuning job: GPUs, per-device batch, hours, inference GPUs and tokens/s",
        description="Estimate, before launching, what a tuning job needs on a server type: per-GPU memory (weights, "
        "gradients, optimizer states with ZeRO-3 sharding, activations with and without gradient checkpointing, "
        "INT8 base + LoRA, framework overhead), the smallest GPU count that fits, the per-device batch, the tuning "
        "time from FLOPs over a stated sustained throughput, and batch-1 inference. Every assumption is printed; "
        "docs/planner.md derives the model and compares it with the survey's Table 8.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    plan.add_argument("target", nargs="?", metavar="MODEL|CONFIG",
                      help="a parameter count (7B, 13B, 30B, 65B use LLaMA's real shapes; others get LLaMA "
                      "proportions), a model directory with config.json, or a job config (preset or YAML) whose "
                      "method, scaling, batch and data are planned; default: tiny-lora")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides when a config is given")
    plan.add_argument("--method", choices=["full", "lora"], help="full (ZeRO-3) or lora (INT8 base); default: the "
                      "config's, else full")
    plan.add_argument("--server-type", choices=sorted(SERVER_TYPES),
                      help="the GPU server to plan for; default: the config's, else a800-80g")
    plan.add_argument("--seq-len", type=positive(int),
                      help="max sequence length in tokens (default 512, or the config's)")
    plan.add_argument("--records", type=positive(int), help="training records (default 52,002: Alpaca)")
    plan.add_argument("--mean-tokens", type=positive(float),
                      help="mean tokens per record after the prompt template (default 200, an Alpaca estimate)")
    plan.add_argument("--data", help="a dataset (.json/.jsonl/.parquet) to measure records and mean tokens from, "
                      "with the training pipeline")
    plan.add_argument("--tokenizer", help="model directory whose tokenizer counts --data tokens (default: the "
                      "model's)")
    plan.add_argument("--epochs", type=positive(float), help="passes over the data (default 3)")
    plan.add_argument("--global-batch", type=positive(int), help="sequences per optimizer step across all GPUs "
                      "(default 32, or the config's micro batch x accumulation x workers)")
    plan.add_argument("--lora-targets", type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
                      metavar="MODULES", help="LoRA's target modules, comma-separated, such as "
                      "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (default: attention's four, or the "
                      "config's)")
    plan.add_argument("--calibrate", metavar="RUN_DIR", help="replace the assumed throughput with the one a finished "
                      "run measured (its summary.json; a local folder or storage URI); use a run on the same "
                      "server type")
    plan.add_argument("--calibrate-inference", metavar="RUN_DIR", help="replace each engine's assumed share of the "
                      "batch-1 bandwidth bound with the one a finished 'raytune-it run' measured (its serve.json, "
                      "served on a known scaling.server_type)")
    plan.add_argument("--table", action="store_true", help="print the survey-shaped table: LLaMA 7B-65B x full/LoRA "
                      "x both server types, beside the survey's published full and LoRA columns")
    plan.add_argument("--markdown", metavar="FILE", help="with --table: also write the table as Markdown")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=cmd_plan)

    node = sub.add_parser(
        "node-resources", help="print this node's server-type resources as JSON, for ray start --resources",
        description="Detect the node's GPUs and print the custom Ray resources its server type carries, e.g. "
        '{"server_type:a800-80g": 8}. The cluster/ start commands use it: ray start --resources="$(raytune-it '
        'node-resources)".')
    node.add_argument("--gpu-name", action="append", help="use these GPU names instead of detecting (repeatable)")
    node.set_defaults(func=cmd_node_resources)

    model = sub.add_parser("model", help="base models").add_subparsers(dest="action", metavar="ACTION", required=True)
    tiny = model.add_parser("tiny", help="build the built-in tiny-llama (once) and print its directory")
    tiny.set_defaults(func=cmd_model_tiny)
    _name_each_command_parser(parser)
    return parser


def _name_each_command_parser(parser: argparse.ArgumentParser) -> None:
    """Give each command's namespace its own parser, so that a flag it does not know is reported with that
    command's usage ('raytune-it data generate: error: ...'), not the top level's."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for command in action.choices.values():
            command.set_defaults(command_parser=command)
            _name_each_command_parser(command)


#: What a secret on the command line is replaced with in ``sys.argv`` once parsed.
REDACTED = "<redacted>"


def redacted_argv(argv: Sequence[str]) -> list[str]:
    """The command line with its secrets' values replaced. Libraries record ``sys.argv`` (W&B keeps it with
    every run), and a key given as ``serve.api_key=...`` or ``--api-key ...`` must not go with it."""
    from raytune_it.config.schema import SECRETS

    secret_overrides = tuple(f"{section}.{key}=" for section, key in SECRETS)
    out: list[str] = []
    for index, arg in enumerate(argv):
        if index and argv[index - 1] == "--api-key":
            arg = REDACTED
        elif arg.startswith(secret_overrides) or arg.startswith("--api-key="):
            arg = arg.split("=", 1)[0] + "=" + REDACTED
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if argv is None:
        sys.argv[:] = redacted_argv(sys.argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
