#!/usr/bin/env bash
# CI: run the demo workflow on a real one-node SLURM cluster (fake GPU) and check that
#   1. a corrupt FCS file fails its SLURM job and the workflow, naming the sample;
#   2. after the file is restored, a rerun succeeds and recomputes none of the ingest jobs
#      that had finished (their logs keep their mtimes; one ingest job runs; their
#      results/flow/*.h5ad are intermediates, deleted once the run has used them);
#   3. the GPU rule (train_flow) reached SLURM with a GPU request;
#   4. results/tables/samples.tsv and kinetics.tsv equal those of a local run, byte for byte.
# The SLURM run works on a copy of the simulated cohort, so the local run's input stays intact.
#
# Run as root (it installs Debian's slurmctld slurmd slurm-client munge when missing):
#   BCELLMAP_VENV=/path/to/venv .ci/slurm/run_e2e.sh
# BCELLMAP_VENV: venv with bcellmap, snakemake and snakemake-executor-plugin-slurm (default:
#   the active venv, $VIRTUAL_ENV). SLURM jobs find its commands through PATH (sbatch
#   --export=ALL, the plugin's default).
# BCELLMAP_SLURM_TIMEOUT: seconds allowed per snakemake run (default 900), so a scheduler
#   fault fails the check instead of hanging it.
# BCELLMAP_SLURM_PATIENTS / BCELLMAP_SLURM_EVENTS: the demo cohort is simulated with this
#   many events per FCS file (default 5000) and cut to its first patients (default 2, all
#   their visits), so that its ~70 SLURM jobs fit the CI budget on 2 cores.
# BCELLMAP_SLURM_KEEP=1 keeps the temp folder (runs, cluster logs) for inspection.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${BCELLMAP_VENV:-${VIRTUAL_ENV:-}}
RUN_TIMEOUT=${BCELLMAP_SLURM_TIMEOUT:-900}
PATIENTS=${BCELLMAP_SLURM_PATIENTS:-1}
EVENTS=${BCELLMAP_SLURM_EVENTS:-3000}

log() { echo "[slurm-e2e] $*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (starts SLURM daemons, installs packages)"
[ -n "$VENV" ] && [ -x "$VENV/bin/snakemake" ] && [ -x "$VENV/bin/bcellmap" ] \
    || fail "set BCELLMAP_VENV (or activate a venv) with bcellmap and snakemake installed"
VENV=$(cd "$VENV" && pwd)
export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1

# shellcheck source=cluster.sh
source "$REPO/.ci/slurm/cluster.sh"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bcellmap-slurm-e2e.XXXXXX")
STATE="$WORK/cluster"

_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ] && [ -d "$STATE/log" ]; then
        log "exit $rc; last lines of the SLURM daemon logs:"
        tail -n 30 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 2>/dev/null || true
    fi
    slurm_stop "$STATE"
    if [ "${BCELLMAP_SLURM_KEEP:-0}" = 1 ]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap _cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The SLURM settings of a CI cluster without slurmdbd. The workflow profile replaces
# profiles/default (its `resources: gpu=1` limit is for workstations).
SLURM_ARGS=(
    --workflow-profile "$REPO/profiles/slurm"
    --slurm-status-command squeue     # no slurmdbd, so no sacct
    --slurm-no-account                # no accounts without slurmdbd
    --slurm-init-seconds-before-status-checks 3   # short jobs: poll soon (MinJobAge=300)
    --seconds-between-status-checks 2             # ... and often (the default is 10 s)
    --slurm-keep-successful-logs
)

# snakemake in folder DIR with the given arguments, output shown and saved to LOGFILE.
_snakemake() {
    local dir=$1 logfile=$2
    shift 2
    # cd rather than --directory: the plugin puts its logs relative to the start folder.
    (cd "$dir" && timeout --kill-after=30 "$RUN_TIMEOUT" \
        snakemake -s "$REPO/Snakefile" "$@" 2>&1) | tee "$logfile"
}

# "log mtime" of every finished or failed ingest job in DIR (logs/ingest_flow/*.log), sorted:
# a job's log is rewritten only when the job runs again.
_ingest_mtimes() {
    find "$1/logs/ingest_flow" -maxdepth 1 -name '*.log' -printf '%f %T@\n' 2>/dev/null | sort
}

START=$SECONDS
log "venv $VENV; work folder $WORK"
slurm_install
slurm_start "$STATE"

# --- preflight: plain sbatch jobs, one of them asking for the (fake) GPU -------------------
log "preflight: a job that writes a file, and a job with --gres=gpu:1"
sbatch --wait --parsable -o "$WORK/preflight.out" \
    --wrap "echo written-by-slurm > '$WORK/preflight.txt'"
[ "$(cat "$WORK/preflight.txt")" = written-by-slurm ] || fail "preflight job wrote nothing"
sbatch --wait --parsable --gres=gpu:1 -o "$WORK/preflight-gpu.out" \
    --wrap 'echo "gpus_on_node=${SLURM_GPUS_ON_NODE:-0}"'
grep -q '^gpus_on_node=1$' "$WORK/preflight-gpu.out" || fail "GPU job got no GPU"
log "preflight passed (after $((SECONDS - START)) s)"

# --- the demo cohort, cut to its first patients ---------------------------------------------
COHORT="$WORK/cohort"
log "simulating the demo cohort ($EVENTS events per file; first $PATIENTS patients)"
bcellmap simulate --out "$COHORT" --preset fixture --events "$EVENTS" --no-scrna >/dev/null
# The figures are tested by pytest; here they would only add minutes of UMAP compilation.
printf "report:\n  enabled: false\n" > "$WORK/ci.yaml"
# The cut sheet sits beside the full one, so its relative paths still resolve. Prints the
# first flow sample of the cut sheet and its file: the one the SLURM run will see corrupted.
read -r VICTIM VICTIM_NAME < <("$VENV/bin/python" - "$COHORT" "$PATIENTS" <<'EOF'
import csv
import sys
from pathlib import Path

cohort, n_patients = Path(sys.argv[1]), int(sys.argv[2])
with (cohort / "samples.tsv").open(newline="") as handle:
    reader = csv.DictReader(handle, delimiter="\t")
    rows, columns = list(reader), reader.fieldnames
keep = sorted({row["patient_id"] for row in rows})[:n_patients]
rows = [row for row in rows if row["patient_id"] in keep]
with (cohort / "ci_samples.tsv").open("w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
victim = next(row for row in rows if row["modality"] == "flow")
print(victim["sample_id"], victim["path"])
EOF
)
[ -n "${VICTIM:-}" ] || fail "no flow sample in the demo sheet"
log "cohort: $(($(wc -l <"$COHORT/ci_samples.tsv") - 1)) samples"

# --- local reference run ---------------------------------------------------------------------
LOCAL="$WORK/local"
mkdir -p "$LOCAL"
log "local run"
T0=$SECONDS
_snakemake "$LOCAL" "$WORK/local.log" --cores 2 --configfile "$WORK/ci.yaml" \
    --config samples="$COHORT/ci_samples.tsv" \
    || fail "local run failed"
log "local run took $((SECONDS - T0)) s"

# --- SLURM run 1: the cohort copied, one FCS file truncated ----------------------------------
RUN="$WORK/slurm-run"
mkdir -p "$RUN"
cp -r "$COHORT" "$RUN/cohort"
VICTIM_FILE="$RUN/cohort/$VICTIM_NAME"
[ -f "$VICTIM_FILE" ] || fail "no file $VICTIM_FILE for sample $VICTIM"
cp "$VICTIM_FILE" "$WORK/victim.fcs"
truncate -s "$(($(stat -c %s "$VICTIM_FILE") / 2))" "$VICTIM_FILE"
log "truncated $VICTIM_FILE (sample $VICTIM) to half its size"
SLURM_ARGS+=(--configfile "$WORK/ci.yaml" --config samples="$RUN/cohort/ci_samples.tsv")

# The preflight reads every header before any job: the truncated file stops the run at once,
# naming the sample, and nothing is submitted.
log "preflight of the run with a truncated file (must stop before any job, naming $VICTIM)"
if _snakemake "$RUN" "$WORK/slurm-preflight.log" "${SLURM_ARGS[@]}"; then
    fail "the run with a truncated FCS file passed the preflight"
fi
grep -q "^$VICTIM (line [0-9]*, flow): ERROR" "$WORK/slurm-preflight.log" \
    || fail "the preflight does not name sample $VICTIM"
if grep -q 'has been submitted with SLURM jobid' "$WORK/slurm-preflight.log"; then
    fail "jobs were submitted although the preflight failed"
fi
# Without the preflight, the failure must surface in the cluster job, naming the sample.
printf 'preflight: false\n' >"$WORK/no-preflight.yaml"
log "SLURM run 1 without preflight (must fail on sample $VICTIM)"
T0=$SECONDS
if _snakemake "$RUN" "$WORK/slurm-fail.log" "${SLURM_ARGS[@]}" \
        --configfile "$WORK/ci.yaml" "$WORK/no-preflight.yaml" --keep-going; then
    fail "the SLURM run succeeded with a truncated FCS file"
fi
log "SLURM run 1 failed as it should, after $((SECONDS - T0)) s"
grep -q 'has been submitted with SLURM jobid' "$WORK/slurm-fail.log" \
    || fail "no SLURM submissions in the log"
grep -q '^Error in rule ingest_flow:' "$WORK/slurm-fail.log" \
    || fail "the log shows no failed ingest_flow job"
# The error block names the sample's outputs, and the rule log shown under it (show-failed-logs)
# carries bcellmap's message "sample '<id>', file ...: not a readable FCS file ...".
grep -A 4 '^Error in rule ingest_flow:' "$WORK/slurm-fail.log" \
    | grep -q "output: results/flow/$VICTIM.h5ad" \
    || fail "the error block does not name the failed sample $VICTIM"
grep -Fq "error: sample '$VICTIM'" "$WORK/slurm-fail.log" \
    || fail "the log does not show bcellmap's error for sample $VICTIM"
grep -q "$VICTIM" "$RUN/logs/ingest_flow/$VICTIM.log" \
    || fail "the ingest log does not name sample $VICTIM"
[ ! -e "$RUN/results/flow/$VICTIM.h5ad" ] || fail "the failed job left results/flow/$VICTIM.h5ad"
_ingest_mtimes "$RUN" | grep -v "^$VICTIM.log " >"$WORK/ingest-before.txt" || true
FINISHED=$(wc -l <"$WORK/ingest-before.txt")
[ "$FINISHED" -ge 1 ] || fail "no other sample finished ingest before the failure"
log "$FINISHED ingest jobs of other samples finished; the failed one named $VICTIM"

# --- SLURM run 2: file restored, the run resumes ---------------------------------------------
cp "$WORK/victim.fcs" "$VICTIM_FILE"
log "SLURM run 2 (restored $VICTIM_FILE; must resume and succeed)"
T0=$SECONDS
_snakemake "$RUN" "$WORK/slurm-resume.log" "${SLURM_ARGS[@]}" || fail "the resumed SLURM run failed"
log "SLURM run 2 took $((SECONDS - T0)) s"
grep -q 'has been submitted with SLURM jobid' "$WORK/slurm-resume.log" \
    || fail "no SLURM submissions in the log"
# No ingest job that had finished ran again, and only the restored sample was ingested.
_ingest_mtimes "$RUN" | grep -v "^$VICTIM.log " >"$WORK/ingest-after.txt"
if ! diff "$WORK/ingest-before.txt" "$WORK/ingest-after.txt"; then
    fail "the rerun ran finished ingest jobs again (above: log mtimes before < > after)"
fi
grep -Eq '^ingest_flow +1$' "$WORK/slurm-resume.log" \
    || fail "the rerun did not run exactly one ingest_flow job (see its job stats)"
log "the rerun ingested only $VICTIM; $FINISHED finished samples kept"

# The GPU rule's job is recent enough (MinJobAge) for scontrol to show its request. (The
# per-sample map_annotate_flow jobs ask for a GPU only where the main process sees one or
# device is gpu: mapping one sample takes seconds on a CPU.)
GPU_JOBS=$(grep -Eo 'SLURM jobid [0-9]+ \(log: [^)]*rule_train_flow' \
    "$WORK/slurm-resume.log" | awk '{print $3}')
[ -n "$GPU_JOBS" ] || fail "no train_flow SLURM job in the log"
GPU_SEEN=0
for job in $GPU_JOBS; do
    if details=$(scontrol show job -o "$job" 2>/dev/null); then
        grep -Eq 'gres/gpu=1|gres:gpu:1' <<<"$details" \
            || fail "SLURM job $job (GPU rule) has no GPU request: $details"
        GPU_SEEN=$((GPU_SEEN + 1))
    fi
done
[ "$GPU_SEEN" -ge 1 ] || fail "the GPU rule's SLURM job is no longer known to scontrol"
log "$GPU_SEEN GPU-rule SLURM job(s) carry a gpu=1 request"

# --- the SLURM results equal the local run's ---------------------------------------------------
for table in samples.tsv kinetics.tsv; do
    if ! cmp "$LOCAL/results/tables/$table" "$RUN/results/tables/$table"; then
        diff "$LOCAL/results/tables/$table" "$RUN/results/tables/$table" | head -n 40 >&2 || true
        fail "results/tables/$table differs between the local and the SLURM run"
    fi
done
log "results/tables/samples.tsv and kinetics.tsv: SLURM run == local run"

# --- what the run could not stand behind, printed by onsuccess/onerror on the cluster too ------
grep -q 'bcellmap run summary' "$WORK/slurm-resume.log" \
    || fail "the SLURM run printed no end-of-run summary (onsuccess)"
grep -q 'bcellmap run summary' "$WORK/slurm-fail.log" \
    || fail "the failed SLURM run printed no end-of-run summary (onerror)"
grep -q 'flags page: results/tables/flags.tsv' "$WORK/slurm-resume.log" \
    || fail "the summary names no flags page"
log "the end-of-run summary is printed under SLURM (onsuccess and onerror)"
log "PASSED in $((SECONDS - START)) s"
