#!/usr/bin/env bash
# The llm image's entrypoint: the Ollama daemon and the runner (or any command given, e.g.
# `python scripts/download_models.py --pipeline llm`) side by side in one container.
#   1. start `ollama serve` (it binds OLLAMA_HOST, loopback: only the runner's port is published)
#   2. wait until it answers (OLLAMA_START_TIMEOUT seconds, default 60), else exit 1
#   3. run the command; when either process exits, stop the other and exit, so Docker's (or
#      go-livepeer's) restart policy brings the pair back: the command's status when it ended
#      first, a failure when the daemon died under it.
#   SIGTERM (docker stop, go-livepeer's stop): the command alone first, so the runner finishes
#   its requests in flight, which still need the daemon; once it has exited the daemon is
#   stopped, and the container exits with the command's status (0 after a graceful shutdown).
#   The signal is passed on once: a second SIGTERM makes uvicorn drop what is in flight.
set -uo pipefail

: "${OLLAMA_HOST:=http://127.0.0.1:11434}"
export OLLAMA_HOST
case "$OLLAMA_HOST" in
  *://*) url="$OLLAMA_HOST" ;;
  *) url="http://$OLLAMA_HOST" ;;
esac

# The daemon must write its model store (pulls, pruning). go-livepeer creates -aiModelsDir as
# its own user (usually root) and the image runs as uid 1000, so a store it cannot write is
# refused at once, in one line: not run as root to take it over, not moved to a folder inside
# the container (its models would vanish with the container), and an exit at start is one
# failed Warm in go-livepeer, not a restart loop.
if [ -n "${OLLAMA_MODELS:-}" ] && ! { mkdir -p "$OLLAMA_MODELS" 2>/dev/null \
    && [ -w "$OLLAMA_MODELS" ] && [ -x "$OLLAMA_MODELS" ]; }; then
  echo "llm-entrypoint: OLLAMA_MODELS=$OLLAMA_MODELS is not writable by uid $(id -u):" \
       "on the host, run: sudo mkdir -p <models dir>/ollama &&" \
       "sudo chown -R $(id -u):$(id -g) <models dir>/ollama (docs/deploy.md)" >&2
  exit 1
fi

stopping=""
command_pid=""
on_signal() {
  [ -n "$stopping" ] && return
  stopping=1
  kill -TERM "${command_pid:-$ollama_pid}" 2>/dev/null
}
trap on_signal TERM INT

ollama serve &
ollama_pid=$!

deadline=$((SECONDS + ${OLLAMA_START_TIMEOUT:-60}))
until curl -fsS --max-time 2 "$url/api/version" >/dev/null 2>&1; do
  if [ -n "$stopping" ]; then wait "$ollama_pid"; exit 143; fi
  if ! kill -0 "$ollama_pid" 2>/dev/null; then
    echo "llm-entrypoint: ollama serve exited during start-up" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "llm-entrypoint: ollama did not answer at $url within ${OLLAMA_START_TIMEOUT:-60}s" >&2
    kill -TERM "$ollama_pid" 2>/dev/null
    wait
    exit 1
  fi
  sleep 0.5
done

"$@" &
command_pid=$!
# A signal in the instant before command_pid was set went to the daemon: pass it on.
if [ -n "$stopping" ]; then kill -TERM "$command_pid" 2>/dev/null; fi

# `wait -n` also returns when a trapped signal arrives: wait again until a child has exited.
while :; do
  wait -n -p exited "$ollama_pid" "$command_pid"
  status=$?
  if [ -n "${exited:-}" ]; then break; fi
done

if [ "$exited" = "$ollama_pid" ]; then
  echo "llm-entrypoint: ollama serve exited (status $status); stopping $1" >&2
  kill -TERM "$command_pid" 2>/dev/null
  wait "$command_pid"
  exit $((status == 0 ? 1 : status))
fi
if [ -z "$stopping" ]; then
  echo "llm-entrypoint: $1 exited (status $status); stopping ollama serve" >&2
fi
kill -TERM "$ollama_pid" 2>/dev/null
wait "$ollama_pid"
exit "$status"
