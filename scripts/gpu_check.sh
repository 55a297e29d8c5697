#!/usr/bin/env bash
# GPU check (one CUDA GPU, at most ~8 minutes on an H100): the full-size reference folders written
# in fp16, their per-evaluation cost on the GPU (bench/bench_fullsize.py: load, forward,
# forward + backward, peak GPU memory), the engine against a plain loop on the SD 2.1-base UNet
# (bench/bench_engine.py --arch sd21) and the dry runs of one notebook per paper on cuda in fp16
# (bfloat16 for 20_attribution, which takes gradients).  Everything goes to
# ${OUT:-gpu-check}/: bench_gpu.json, bench_engine.txt, dryrun/ and summary.md.  Nothing in the
# package depends on this script.
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PY:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
export T2I_FULLSIZE=${T2I_FULLSIZE:-$HOME/.cache/t2i-repro/fullsize}
export T2I_CACHE=${T2I_CACHE:-$OUT/cache}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
timeout 240 $PY -m t2i_common.fullsize write all | tee "$OUT/write.txt"
timeout 150 $PY bench/bench_fullsize.py --device cuda --dtype float16 --out "$OUT/bench_gpu.json" \
    | tee "$OUT/bench_gpu.txt"
timeout 60 $PY bench/bench_engine.py --arch sd21 --device cuda | tee "$OUT/bench_engine.txt"
timeout 200 $PY -m t2i_common.dryrun 00 10 20 30 40 50 --device cuda \
    --dtype "00_tour=float16,10_ad_datasets=float16,20_attribution=bfloat16,30_unclip_quality=float16,40_gdbench=float16,50_relation_testing=float16" \
    --output-dir "$OUT/dryrun" | tee "$OUT/dryrun.txt" || true
$PY - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = json.loads((out / "bench_gpu.json").read_text())
lines = ["| model | load s | fwd s | fwd+bwd s | prior fwd s | image s | peak GPU GiB |", "|---|---|---|---|---|---|---|"]
f = lambda r, k: f"{r[k]:.3f}" if isinstance(r.get(k), (int, float)) else "-"
for r in rows:
    lines.append(f"| {r['name']} | {f(r,'load_s')} | {f(r,'fwd_s')} | {f(r,'fwd_bwd_s')} | {f(r,'prior_fwd_s')} | {f(r,'image_s')} | {f(r,'peak_gb')} |")
times = out / "dryrun" / "dryrun_times.json"
if times.exists():
    lines += ["", "| notebook (dry run, cuda) | wall s |", "|---|---|"]
    lines += [f"| {k} | {v if v is not None else 'FAILED'} |" for k, v in json.loads(times.read_text()).items()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
echo "gpu check: $(( $(date +%s) - t0 )) s"
