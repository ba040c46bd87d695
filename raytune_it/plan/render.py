"""Plans as people read them: one plan in detail, and the survey-shaped table (terminal and Markdown)."""

from __future__ import annotations

from typing import Any

from raytune_it.hardware import SERVER_TYPES
from raytune_it.plan.memory import LLAMA_SHAPES
from raytune_it.plan.planner import SURVEY_A800, Plan, Workload, plan


def survey_table(**workload: Any) -> list[Plan]:
    """7B-65B x full/LoRA x both server types, on the survey's data (Alpaca-52K, 3 epochs, 512 tokens)."""
    return [plan(Workload(shape=shape, method=method, server_type=server, **workload))
            for server in SERVER_TYPES for method in ("full", "lora") for shape in LLAMA_SHAPES.values()]


def _size(plan_: Plan) -> str:
    return next((size for size, shape in LLAMA_SHAPES.items() if shape.name == plan_.model), plan_.model)


def _num(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


SURVEY_COLUMNS = ["model", "method", "server", "GPUs", "batch/device", "est. hours", "survey GPUs / batch / hours",
                  "infer GPUs bf16 / int8", "max tokens/s bf16 / int8"]


def survey_rows(plans: list[Plan]) -> list[list[str]]:
    rows = []
    for item in plans:
        size = _size(item)
        survey = SURVEY_A800[item.method].get(size) if item.server_type == "a800-80g" else None
        bf16, int8 = item.inference["bf16"], item.inference["int8"]
        rows.append([
            size, item.method, item.server_type,
            _num(item.num_gpus) if item.feasible else "does not fit",
            _num(item.per_device_batch_size), _num(item.est_hours, "{:.1f}"),
            " / ".join(str(v) for v in survey) if survey else "",
            f"{_num(bf16['num_gpus'])} / {_num(int8['num_gpus'])}",
            f"{_num(bf16['max_tokens_per_second'], '{:.0f}')} / {_num(int8['max_tokens_per_second'], '{:.0f}')}",
        ])
    return rows


QUANTIZATION_COLUMNS = ["server", "base", "fits", "memory / GPU (GiB)", "batch/device", "est. hours"]


def quantization_rows(workload: Workload) -> list[list[str]]:
    """A LoRA workload with an INT8 and an NF4 base on both server types: what 4-bit changes."""
    from dataclasses import replace

    from raytune_it.hardware import SERVER_TYPES

    rows = []
    for server in SERVER_TYPES:
        for quantization in ("int8", "nf4"):
            item = plan(replace(workload, server_type=server, lora_quantization=quantization))
            rows.append([server, quantization, "yes" if item.feasible else "no",
                         f"{item.memory_gib.get('total', 0):.1f}", _num(item.per_device_batch_size),
                         _num(item.est_hours, "{:.1f}")])
    return rows


def print_quantization_table(workload: Workload, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"LoRA on {workload.shape.name}: an INT8 or an NF4 (4-bit, QLoRA) base, both server types")
    for column in QUANTIZATION_COLUMNS:
        table.add_column(column, justify="left" if column in ("server", "base", "fits") else "right")
    for row in quantization_rows(workload):
        table.add_row(*row)
    console.print(table)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def survey_markdown(plans: list[Plan]) -> str:
    first = plans[0].assumptions
    note = (f"Alpaca-sized data: {first['records']:,} records x {first['mean_tokens_per_record']} tokens x "
            f"{first['epochs']:g} epochs, sequence length {first['seq_len']}, gradient checkpointing, global batch "
            f"{first['global_batch_sequences']} sequences. Survey column: Table 8, full and LoRA tuning on "
            "A800-80G.\n\n")
    return note + markdown_table(SURVEY_COLUMNS, survey_rows(plans))


def print_survey_table(plans: list[Plan], console: Any) -> None:
    from rich.table import Table

    table = Table(title="Planner: LLaMA 7B-65B, full tuning (ZeRO-3) and LoRA (INT8), both server types")
    for column in SURVEY_COLUMNS:
        table.add_column(column, justify="left" if column in ("model", "method", "server") else "right")
    for row in survey_rows(plans):
        table.add_row(*row)
    console.print(table)


def print_plan(item: Plan, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"Plan: {item.model} ({item.parameters / 1e9:.2f}B parameters), {item.method} on "
                        f"{item.server_type}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows: list[tuple[str, str]] = [("verdict", item.reason)]
    if item.feasible:
        rows += [
            ("GPUs (servers)", f"{item.num_gpus} ({item.servers})"),
            ("per-device batch", f"{item.per_device_batch_size} (limited by {item.batch_limited_by}; memory alone "
                                 f"allows {item.max_batch_that_fits}"
                                 + (f", {item.max_batch_with_full_logits} with the full logits' loss"
                                    if item.max_batch_with_full_logits is not None else "") + ")"),
            ("gradient accumulation", str(item.gradient_accumulation_steps)),
        ]
    rows += [(f"memory / GPU: {key.replace('_', ' ')}", f"{value:.2f} GiB") for key, value in item.memory_gib.items()]
    rows += [
        ("activations / sequence", f"{item.activation_gib_per_sequence['with_checkpointing']:.3f} GiB with "
                                   f"checkpointing, {item.activation_gib_per_sequence['without_checkpointing']:.3f} "
                                   "GiB without"),
        ("training tokens", f"{item.train_tokens:,.0f}"),
        ("training FLOPs", f"{item.train_flops:.3g}"),
        ("sustained throughput / GPU", f"{item.sustained_tflops_per_gpu:g} TFLOP/s"),
    ]
    if item.feasible:
        rows += [("compute / communication", f"{item.compute_hours:.2f} h / {item.communication_hours:.2f} h "
                                             "(they overlap: the larger one counts)"),
                 ("est. tuning time", f"{item.est_hours:.2f} h")]
    for precision, numbers in item.inference.items():
        rates: dict[str, Any] = numbers.get("expected_tokens_per_second") or {}  # type: ignore[assignment]
        expected = ", ".join(f"{engine} {_num(rate, '{:.0f}')}" for engine, rate in rates.items())
        rows.append((f"inference batch 1, {precision}",
                     f"{_num(numbers['num_gpus'])} GPU(s) for {numbers['weights_gib']} GiB of weights, at most "
                     f"{_num(numbers['max_tokens_per_second'], '{:.0f}')} tokens/s (memory bandwidth bound)"
                     + (f"; expected: {expected} tokens/s" if expected else "")))
    for key, value in item.assumptions.items():
        if value is not None:
            rows.append((f"assumption: {key.replace('_', ' ')}", str(value)))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
