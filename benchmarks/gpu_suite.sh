#!/usr/bin/env bash
# The GPU benchmarks of RESULTS.md in one go, most important first; each run has its own time limit and
# a failure (out of memory, say) does not stop the others. No TensorFlow, draccus or dataset needed.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR                 # everything
#   ONLY="tests step_openvla-7b_b16_a4_gc" bash benchmarks/gpu_suite.sh OUT_DIR   # the runs named
#   SET=targets bash benchmarks/gpu_suite.sh OUT_DIR    # the cost targets' runs only (time limits sum to 570 s)
#
# Writes one JSON per run and suite.log into OUT_DIR. "tests" runs the CUDA tests of the fused surgery
# kernels (compiled, not interpreted) without conftest.py, which needs TensorFlow.
set -u
out=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$out"
if [[ ${SET:-} == targets ]]; then  # full fine-tune B=16/A=4 and B=32/A=8, LoRA one-pass, FSDP over one GPU, surgery
    ONLY="tests step_openvla-7b_b16_a4_gc step_openvla-7b_b32_a8_gc step_openvla-7b_lora32_b8_a4_one_pass
          grad_products_openvla-7b step_openvla-7b_b16_a4_gc_fsdp1 step_openvla-7b_b16_a4_gc_fsdp1_kept"
    ONLY=$(echo $ONLY)
fi
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
py=${PYTHON:-python3}
step="benchmarks/bench_step.py --preset openvla-7b --device cuda --dtype bfloat16 --warmup 2 --repeats 5"

run() {  # run LIMIT_S NAME ARGS...
    local limit=$1 name=$2
    shift 2
    [[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$py" "$@" --out "$out/$name.json" || echo "=== $name FAILED (exit $?)"
    echo "=== $name took $((SECONDS - t0))s"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$py" -c "import torch, transformers, timm, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'timm', timm.__version__, 'peft', peft.__version__)"
    if [[ -z ${ONLY:-} || " $ONLY " == *" tests "* ]]; then
        echo "=== tests"
        timeout 90 "$py" -m pytest -q -p no:cacheprovider --noconftest tests/test_fused_surgery.py \
            || echo "=== tests FAILED"
    fi
    run 80 step_openvla-7b_b16_a4_gc_one_pass $step --batch 16 --anchor_batch 4 --grad_checkpointing true \
        --step_impl one_pass
    run 110 step_openvla-7b_b32_a8_gc_one_pass $step --batch 32 --anchor_batch 8 --grad_checkpointing true \
        --step_impl one_pass
    run 60 step_openvla-7b_lora32_b8_a4_one_pass $step --batch 8 --anchor_batch 4 --lora_rank 32 \
        --autocast bfloat16 --step_impl one_pass
    run 80 step_openvla-7b_b16_a4_gc $step --batch 16 --anchor_batch 4 --grad_checkpointing true
    run 100 step_openvla-7b_b32_a8_gc $step --batch 32 --anchor_batch 8 --grad_checkpointing true
    run 40 grad_products_openvla-7b benchmarks/bench_grad_products.py --preset openvla-7b --device cuda
    run 60 step_openvla-7b_lora32_b8_a4 $step --batch 8 --anchor_batch 4 --lora_rank 32 --autocast bfloat16
    run 80 step_openvla-7b_b16_a4 $step --batch 16 --anchor_batch 4
    run 80 step_openvla-7b_b16_a4_one_pass $step --batch 16 --anchor_batch 4 --step_impl one_pass
    run 100 step_openvla-7b_b16_a4_gc_fsdp1 $step --batch 16 --anchor_batch 4 --grad_checkpointing true --fsdp true
    run 100 step_openvla-7b_b16_a4_gc_fsdp1_kept $step --batch 16 --anchor_batch 4 --grad_checkpointing true \
        --fsdp true --keep_weights_gathered true
    run 100 step_openvla-7b_b16_a4_gc_fsdp1_one_pass $step --batch 16 --anchor_batch 4 --grad_checkpointing true \
        --fsdp true --step_impl one_pass
    run 100 step_openvla-7b_b32_a8_gc_anchorckpt $step --batch 32 --anchor_batch 8 --grad_checkpointing true \
        --anchor_checkpointing true
} 2>&1 | tee "$out/suite.log"
