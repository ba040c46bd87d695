#!/usr/bin/env bash
# What only a GPU shows (the checks before the 7B shape take about 6 minutes on one H100; all of them
# take longer than one 15-minute lease, so pick with ONLY, below): INT8 LoRA and
# DeepSpeed ZeRO-3 (NCCL) training through `raytune-it train` with the exports reloaded, the
# training-overhead benchmark on the GPU for the tiny model and a ~0.85B random LLaMA, and
# the batch-1 generation rate of both; then the 7B shape: LoRA on bf16, INT8 and NF4 bases against the
# bare loop and Trainer (tokens/s, peak memory, MFU), ZeRO-3 on one GPU, NF4 training, and vLLM's batch-1
# decode against the memory-bandwidth bound where vLLM is installed. Each check has its own time limit and log; a failed
# check is reported and the next one runs.
#
#   [ONLY="CHECK ..."] bash bench/gpu_checks.sh [LOG_DIR]   (needs raytune-it's dependencies and a CUDA torch)
set -uo pipefail
LOGS=${1:-gpu-checks}
mkdir -p "$LOGS"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
status=0

check() {  # check NAME SECONDS COMMAND...; ONLY="NAME ..." runs those alone
  local name=$1 limit=$2; shift 2
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  local started=$SECONDS
  echo "=== $name"
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - started)) s"
  grep -v -E "^\s*$|step [0-9]+/|Writing model shards|Loading weights" "$LOGS/$name.log" | tail -n 30
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, ray, deepspeed, bitsandbytes as b; print('torch', torch.__version__, \
'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| ray', \
ray.__version__, '| deepspeed', deepspeed.__version__, '| bitsandbytes', b.__version__)"

GPU="scaling.use_gpu=true scaling.num_workers=1 scaling.cpus_per_worker=4 train.max_steps=60 train.eval_every_steps=30"
check lora-int8-gpu 150 python3 -m raytune_it train tiny-lora $GPU run.storage=$WORK run.name=lora
check full-zero3-gpu 180 python3 -m raytune_it train tiny-full $GPU run.storage=$WORK run.name=full
check exports-reload 60 python3 - "$WORK" <<'PY'
import sys, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from raytune_it.models.loading import resolve_model_path
work = Path(sys.argv[1])
full = AutoModelForCausalLM.from_pretrained(str(work / "full/export"), dtype=torch.bfloat16).cuda()
base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-llama"), dtype=torch.bfloat16).cuda()
lora = PeftModel.from_pretrained(base, str(work / "lora/export")).cuda()
for name, model, folder in (("full", full, work / "full/export"), ("lora", lora, work / "lora/export")):
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("### Instruction:\nName a fruit.\n\n### Response:\n", return_tensors="pt").to("cuda")
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    print(name, "generates", out.shape[1] - ids["input_ids"].shape[1], "tokens:", repr(tok.decode(out[0][ids["input_ids"].shape[1]:])))
PY
check bench-train-tiny 300 python3 bench/train_overhead.py --device cuda --variants bare trainer raytune-it --steps 200 --warmup-steps 20 --repeats 2
check random-llama 90 python3 bench/random_llama.py "$WORK/llama-0.85b"
check bench-train-0.85b 200 python3 bench/train_overhead.py --device cuda --model "$WORK/llama-0.85b" --variants bare trainer raytune-it --steps 60 --warmup-steps 10 --repeats 1
check generate-rate 90 bash -c "python3 bench/serve_rate.py --in-process-only --device cuda --max-tokens 128 --repeats 3 && python3 bench/serve_rate.py --in-process-only --device cuda --model $WORK/llama-0.85b --max-tokens 128 --repeats 3"
# The 7B shape (#28; random weights, the tiny tokenizer): LoRA on bf16, INT8 and NF4 bases with recomputed
# activations, raytune-it against the bare loop and transformers' Trainer on the same model and batch
# (tokens/s, peak GPU memory, MFU); full tuning with ZeRO-3 on one GPU (the 0.85B model: 7B's 16 bytes a
# parameter do not fit one GPU without offload); NF4 training through `raytune-it train`, its losses finite
# and falling. Too long for one 15-minute lease with the checks above: pick with ONLY, for example
#   ONLY="random-llama-7b lora-7b-bf16 lora-7b-nf4 nf4-gpu vllm-7b-decode eval-7b" bash bench/gpu_checks.sh
check random-llama-7b 240 python3 bench/random_llama.py "$WORK/llama-7b" --hidden 4096 --layers 32 --intermediate 11008 --heads 32
LORA7B="--device cuda --model $WORK/llama-7b --recompute --variants bare trainer raytune-it --steps 30 --warmup-steps 5 --repeats 1 --micro-batch-size 4 --loss auto"
check lora-7b-bf16 300 python3 bench/train_overhead.py $LORA7B --quantization none
check lora-7b-int8 360 python3 bench/train_overhead.py $LORA7B --quantization int8
check lora-7b-nf4 360 python3 bench/train_overhead.py $LORA7B --quantization nf4
check zero3-0.85b 300 bash -c "[ -d $WORK/llama-0.85b ] || python3 bench/random_llama.py $WORK/llama-0.85b; python3 -m raytune_it train tiny-full $GPU model.name_or_path=$WORK/llama-0.85b train.max_steps=30 run.storage=$WORK run.name=zero3-085"
check nf4-gpu 150 bash -c "python3 -m raytune_it train tiny-lora $GPU lora.quantization=nf4 run.storage=$WORK run.name=nf4 && python3 -c \"
import json, math, sys
s = json.load(open('$WORK/nf4/summary.json'))
first, last = s['initial_train_loss'], s['final_train_loss']
print('NF4 on CUDA: train loss', first, '->', last, '| eval', s['final_eval_loss'], '| peak GiB', s['peak_memory_bytes'] / 2**30)
sys.exit(0 if math.isfinite(first) and math.isfinite(last) and last < first else 1)\""
# Eval at the 7B shape (#24): batch-1 transformers against the batched engine and vLLM (where installed).
check eval-7b 420 python3 bench/eval_throughput.py --model "$WORK/llama-7b" --device cuda --examples 32
# vLLM on the GPU (where the vllm extra is installed): the 7B-shaped random LLaMA in bf16 at batch 1,
# against the bound of reading every weight once per token (BANDWIDTH_TBS: H100 SXM 3.35, H200 4.8).
if python3 -c "import vllm" 2>/dev/null; then
  check vllm-7b-decode 300 python3 bench/vllm_decode.py "$WORK/llama-7b" --bandwidth-tbs "${BANDWIDTH_TBS:-3.35}"
else
  echo "=== vllm-7b-decode: skipped (vLLM is not installed here; pip install -e '.[vllm]')"
fi
rm -rf "$WORK"
exit $status
