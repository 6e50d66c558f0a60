#!/usr/bin/env bash
# Bring gpujobq up on this machine: keys, a local agent, the controller on
# 127.0.0.1:8001, a demo user with a fresh token. Ctrl-C stops everything; the data in
# var/ stays for the next run.
#
# GPUJOBQ_PORT (8001) and GPUJOBQ_AGENT_PORT (8022, as in inventory.yaml) move the ports.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${GPUJOBQ_BIN:-.venv/bin}
PORT=${GPUJOBQ_PORT:-8001}
AGENT_PORT=${GPUJOBQ_AGENT_PORT:-8022}
export GPUJOBQ_PORT=$PORT
mkdir -p var/demo var/log

"$BIN/gpujobq-controller" keygen >/dev/null
"$BIN/gpujobq-agent" keygen >/dev/null
"$BIN/gpujobq-agent" authorize var/controller/id_ed25519.pub >/dev/null

pids=()
stop() {
    trap - EXIT INT TERM
    echo "stopping gpujobq..."
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}
trap stop EXIT
trap 'stop; exit 0' INT TERM

# Jobs run in hardened containers when a Docker daemon answers (the local job image is
# built once when missing); otherwise as plain processes, which are NOT isolated.
RUNTIME=process
if "$BIN/python" -c 'import docker; docker.from_env().ping()' 2>/dev/null; then
    if scripts/build-job-image.sh; then
        RUNTIME=docker
    else
        echo "could not build the job image; falling back to the process runtime" >&2
    fi
fi

"$BIN/gpujobq-agent" serve --name local --listen 127.0.0.1 --port "$AGENT_PORT" \
    --runtime "$RUNTIME" >>var/log/agent.log 2>&1 &
pids+=($!)
TOKEN=$("$BIN/gpujobq-controller" user add demo 2>/dev/null)
"$BIN/gpujobq-controller" serve >>var/log/controller.log 2>&1 &
pids+=($!)

URL="http://127.0.0.1:$PORT"
for _ in $(seq 1 200); do
    if "$BIN/python" - "$URL" <<'PY' 2>/dev/null; then break; fi
import json, sys, urllib.request
health = json.load(urllib.request.urlopen(sys.argv[1] + "/api/health", timeout=1))
sys.exit(0 if all(a["connected"] for a in health["agents"].values()) else 1)
PY
    if ! kill -0 "${pids[@]}" 2>/dev/null; then
        echo "gpujobq failed to start; see var/log/controller.log and var/log/agent.log" >&2
        exit 1
    fi
    sleep 0.1
done

cat >var/demo/solution.py <<'PY'
import os
print("Hello from GPU", os.environ.get("CUDA_VISIBLE_DEVICES"))
PY
cat >var/demo/config.yaml <<YAML
competition_id: "demo"
project_id: "quickstart"
user_id: "demo"
expected_time: 60
token: "$TOKEN"
YAML

# The gpujobq command's settings for the demo user (a token: owner-only).
(umask 077 && cat >var/demo/gpujobq.yaml <<YAML
server: "$URL"
token: "$TOKEN"
YAML
)

if [ "$RUNTIME" = docker ]; then
    RUNTIME_NOTE="runtime: docker, each job in a hardened container"
else
    RUNTIME_NOTE="runtime: process, NOT isolated; no Docker daemon answered"
fi
cat <<MSG
gpujobq is up at $URL with one local agent ($RUNTIME_NOTE).
Demo user: demo   token: $TOKEN   (logs in var/log/, data in var/)

Submit a job:
  curl -X POST "$URL/api/submit" -H "Authorization: Bearer $TOKEN" -F "code=@var/demo/solution.py" -F "config_file=@var/demo/config.yaml"
List your jobs:
  curl -H "Authorization: Bearer $TOKEN" "$URL/api/jobs?user_id=demo"
Or with the gpujobq command (live queue position and output, the job's exit code):
  GPUJOBQ_CONFIG=var/demo/gpujobq.yaml .venv/bin/gpujobq submit var/demo/solution.py var/demo/config.yaml
The web board (hosts, GPUs, the queue; paste the token to see your jobs): $URL/
The fleet (hosts, GPUs, the job on each), and reloading inventory.yaml after an edit:
  .venv/bin/gpujobq-controller nodes
  .venv/bin/gpujobq-controller reload

Press Ctrl-C to stop.
MSG
wait -n "${pids[@]}"
echo "a gpujobq process exited; see var/log/" >&2
exit 1
