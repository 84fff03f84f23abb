#!/usr/bin/env bash
# Submit an evoray search to a running Ray cluster as a Ray job.
#
#   clusters/submit.sh [SEARCH_SPACE] [evoray run options ...]
#   clusters/submit.sh search_spaces/tiny_cluster.yaml --run-dir /mnt/shared/runs/tiny
#
# What it runs, from the repository root (the job's working directory):
#
#   ray job submit --address http://127.0.0.1:8265 --working-dir . \
#       --runtime-env-json '{"env_vars": {...}, "excludes": [...]}' \
#       -- python -m evoray run SEARCH_SPACE --address auto [options]
#
# The working directory (this checkout, minus the excludes) is uploaded to the cluster and is the
# job's current directory and first on its workers' sys.path, so the job runs this checkout's
# evoray; its dependencies (torch, transformers, ray[default,tune], ...) must already be
# installed in the cluster's Python (clusters/aws.yaml and clusters/README.md do that).
#
# Environment:
#   RAY_DASHBOARD_ADDRESS  the cluster's dashboard (default http://127.0.0.1:8265: a local
#                          cluster, or a remote one through `ray dashboard clusters/aws.yaml` or
#                          `kubectl port-forward`)
#   EVORAY_CLUSTER_HOME    EVORAY_HOME for the job: the zoo is built and cached on the driver
#                          under $EVORAY_CLUSTER_HOME/zoo. On a multi-node cluster it must be
#                          storage every node mounts (workers load the models by path), e.g.
#                          /mnt/shared/evoray; unset, the cluster's own default is used.
#   RAY                    the ray command (default: ray)
#   SUBMIT_ARGS            more `ray job submit` options, e.g. "--no-wait --submission-id x"
#   RUNTIME_ENV_JSON       replaces the runtime env below entirely
#
# Give --run-dir an absolute path on shared storage: a relative output.run_dir would land in the
# job's unpacked copy of the working directory on the head node, which Ray deletes later.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${1:-search_spaces/evolver.yaml}"
if [[ $# -gt 0 ]]; then shift; fi
if [[ ! -f "$CONFIG" ]]; then
    echo "submit.sh: search space $CONFIG not found (paths are relative to the repo root)" >&2
    exit 2
fi
case " $* " in
    *" --run-dir "* | *" --run-dir="*) ;;
    *) echo "submit.sh: note: no --run-dir given; outputs go under the job's temporary" \
        "working directory on the head node" >&2 ;;
esac

ADDRESS="${RAY_DASHBOARD_ADDRESS:-http://127.0.0.1:8265}"
ENV_VARS='"TOKENIZERS_PARALLELISM": "false"'
if [[ -n "${EVORAY_CLUSTER_HOME:-}" ]]; then
    ENV_VARS+=", \"EVORAY_HOME\": \"${EVORAY_CLUSTER_HOME}\""
fi
EXCLUDES='".git", ".venv", "runs", ".cache", ".hypothesis", ".pytest_cache", ".ruff_cache"'
EXCLUDES+=', "*.egg-info", "**/__pycache__", "build", "dist"'
DEFAULT_ENV="{\"env_vars\": {${ENV_VARS}}, \"excludes\": [${EXCLUDES}]}"
RUNTIME_ENV_JSON="${RUNTIME_ENV_JSON:-$DEFAULT_ENV}"

# SUBMIT_ARGS is split on spaces on purpose (several options).
# shellcheck disable=SC2086
exec "${RAY:-ray}" job submit --address "$ADDRESS" --working-dir . \
    --runtime-env-json "$RUNTIME_ENV_JSON" ${SUBMIT_ARGS:-} \
    -- python -m evoray run "$CONFIG" --address auto "$@"
