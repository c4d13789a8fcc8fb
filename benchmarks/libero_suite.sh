#!/usr/bin/env bash
# Seconds per LIBERO episode on a GPU host: 1 vs 8 simulator workers, one libero_spatial task, the 7B-shaped
# random model in bfloat16, full 220-step episodes (a random policy never succeeds early). About 5-8 minutes.
#
#   make libero && bash benchmarks/libero_suite.sh OUT_DIR
#
# MUJOCO_GL=egl renders on the GPU where its EGL driver is installed (Mesa's software EGL otherwise).
set -u
out=${1:?usage: libero_suite.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MUJOCO_GL=${MUJOCO_GL:-egl}
py=${PYTHON:-python3}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "cpus: $(nproc)"
    timeout 570 "$py" benchmarks/bench_libero.py --preset openvla-7b --device cuda --dtype bfloat16 \
        --num_envs 1 8 --episodes_per_env 1 --out "$out/libero_episodes_openvla-7b.json" \
        || echo "=== libero_episodes FAILED (exit $?)"
} 2>&1 | tee "$out/libero_suite.log"
