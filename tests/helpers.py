"""Small helpers shared by the integration tests."""

from __future__ import annotations

import json
import socket
from pathlib import Path

SUMMARY_KEYS = {"method", "server_type", "num_workers", "per_device_batch_size", "gradient_accumulation_steps",
                "tuning_seconds", "train_tokens", "tokens_per_second", "peak_memory_bytes", "final_train_loss",
                "final_eval_loss"}


def raw_metrics(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl in write order, duplicates (re-run steps) included."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def latest_checkpoint_step(run_dir) -> int | None:
    """The step of the checkpoint Ray Train has committed as latest (what a restart resumes from)."""
    from raytune_it.storage import as_location
    from raytune_it.train.checkpoints import latest_checkpoint_step as latest

    return latest(as_location(run_dir))


def stop_process_group(process, first_signal=None, timeout: float = 30) -> None:
    """Stop a server a test started with ``start_new_session=True``, children included: ``first_signal``
    (SIGTERM by default), then SIGKILL if it is not gone in ``timeout`` seconds."""
    import os
    import signal
    import subprocess

    os.killpg(process.pid, first_signal or signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


LOOPBACK_ADDRESSES = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listeners(root_pid: int | None = None) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket listening in a process below ``root_pid`` (this
    test's by default): Ray's servers, its workers, Serve's proxies and replicas, training workers."""
    import os

    import psutil

    try:
        below = {p.pid: p for p in psutil.Process(root_pid or os.getpid()).children(recursive=True)}
    except psutil.NoSuchProcess:
        return []
    found = []
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.pid in below:
            try:
                name = below[connection.pid].name()
            except psutil.NoSuchProcess:
                continue
            found.append((name, connection.laddr.ip, connection.laddr.port))
    return found


def beyond_loopback(found: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [entry for entry in found if entry[1] not in LOOPBACK_ADDRESSES]


class ListenerWatch:
    """Lists the listening sockets below a process once a second while it runs (servers come and go
    through a run's stages, each living for seconds), keeping every one seen; stopped on leaving the block.
    Each sample scans every socket on the machine, so a shorter interval steals CPU from the run it watches."""

    def __init__(self, root_pid: int) -> None:
        import threading

        self.root_pid, self.seen, self.samples = root_pid, set(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            self.seen.update(listeners(self.root_pid))
            self.samples += 1

    def __enter__(self) -> "ListenerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def generate_text(model, tokenizer, prompt: str = "### Instruction:\nConvert 4 hours to minutes.\n\n### Response:\n",
                  max_new_tokens: int = 8) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def train_tiny_adapter(folder: Path, families: list[str], steps: int = 12, seed: int = 0, rank: int = 8,
                       targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A short LoRA run on some task families, in-process: enough to make two adapters differ."""
    import torch
    from peft import LoraConfig, get_peft_model

    from raytune_it.data.synthetic import generate
    from raytune_it.data.tokenize import collate, tokenize_records
    from raytune_it.models.loading import load_causal_lm, load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer("tiny-llama")
    model = get_peft_model(load_causal_lm("tiny-llama"), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), task_type="CAUSAL_LM"))
    examples = tokenize_records(list(generate(steps * 8, seed=seed, families=families)), tokenizer, 256)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for start in range(0, len(examples), 8):
        loss = model(**collate(examples[start:start + 8], tokenizer.pad_token_id)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def concurrent_completions(client, clients: int, per_client: int, body: dict) -> list[str]:
    """``clients`` threads, each with its own connection, send ``per_client`` completions one after another;
    returns a description of every answer that was not a 200 with exactly ``max_tokens`` tokens or an EOS."""
    import threading

    import httpx

    failures: list[str] = []

    def one_client() -> None:
        with httpx.Client(base_url=client.base_url, headers=client.headers, timeout=300) as own:
            for _ in range(per_client):
                response = own.post("/v1/completions", json=body)
                answer = response.json() if response.status_code == 200 else {}
                choice = (answer.get("choices") or [{}])[0]
                tokens = answer.get("usage", {}).get("completion_tokens", 0)
                if response.status_code != 200 or not (
                        tokens == body["max_tokens"] or (choice.get("finish_reason") == "stop" and tokens >= 1)):
                    failures.append(f"{response.status_code}: {response.text[:300]}")

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def wandb_offline_records(run_folder: Path) -> dict[str, list]:
    """An offline W&B run's records, read from its ``run-<id>.wandb`` file by kind: ``config`` and ``summary``
    (dicts of JSON values, in write order), ``history`` (one dict per ``log``), ``exit`` (exit codes).

    wandb no longer ships a reader (its Go core writes the file), so this reads the format directly:
    a 7-byte header (``:W&B``, magic, version), then LevelDB log records (CRC, length, type) in 32 KiB
    blocks, a record split over blocks as FIRST, MIDDLE..., LAST chunks, each whole record a protobuf.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_folder.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, header = 32768, 7
    out: dict[str, list] = {"config": [], "summary": [], "history": [], "exit": []}
    position, chunks = header, b""
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + header])
        if position + header + length > len(data):  # a record still being written
            break
        chunks += data[position + header:position + header + length]
        position += header + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            which = record.WhichOneof("record_type")
            items = {"run": lambda r: r.run.config.update, "config": lambda r: r.config.update,
                     "summary": lambda r: r.summary.update, "history": lambda r: r.history.item}
            if which in items:
                values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                          for item in items[which](record)}
                out["config" if which == "run" else which].append(values)
            elif which == "exit":
                out["exit"].append(record.exit.exit_code)
    return out
