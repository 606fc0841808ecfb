#!/usr/bin/env bash
# Runs bnn_jax on this machine: one process, or several processes on
# localhost (a real multi-process JAX run on CPU, to exercise the multi-host
# code paths without a cluster). See docs/scaling.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] -- <bnn_jax.main flags>

  --processes=N            processes to start on localhost (default 1). N > 1
                           runs on CPU (JAX_PLATFORMS=cpu), joined through
                           jax.distributed with a coordinator on 127.0.0.1.
  --devices_per_process=D  fake CPU devices per process
                           (--xla_force_host_platform_device_count=D; also
                           selects the CPU). Default: the machine's devices
                           for N = 1, 1 for N > 1.
  --port=P                 coordinator port (default: a free one).
  --grace=S                after one process fails, seconds the others get to
                           stop on SIGTERM before SIGKILL (default 30).
  --python=PATH            interpreter (default: $PYTHON, else .venv/bin/python
                           of this checkout, else python3).
  -h, --help               this text.

Examples:
  launch/local.sh -- --config=configs/digits.py --workdir=/tmp/digits
  launch/local.sh --processes=2 --devices_per_process=2 -- \
      --config=configs/digits.py --workdir=/tmp/digits_2proc

Each process's output is prefixed with [process i]. The exit status is the
first failing process's (143: stopped on SIGTERM after a checkpoint), else 0.
SIGINT/SIGTERM are forwarded to every process.
EOF
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
processes=1
devices=""
port=""
grace=30
python="${PYTHON:-}"
while (($#)); do
  case "$1" in
    --processes=*) processes="${1#*=}" ;;
    --devices_per_process=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --grace=*) grace="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch/local.sh: unknown option $1 (flags for bnn_jax.main go after --)" >&2
       usage >&2; exit 2 ;;
  esac
  shift
done
for value in "$processes" "$grace" ${devices:+"$devices"} ${port:+"$port"}; do
  if ! [[ "$value" =~ ^[0-9]+$ ]] ; then
    echo "launch/local.sh: expected a number, got '$value'" >&2; exit 2
  fi
done
if ((processes < 1)); then
  echo "launch/local.sh: --processes must be >= 1" >&2; exit 2
fi
if (($# == 0)); then
  echo "launch/local.sh: no bnn_jax.main flags after --" >&2
  usage >&2; exit 2
fi
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"
  else python="python3"; fi
fi
cd "$repo"

if ((processes > 1)); then
  devices="${devices:-1}"
fi
if [[ -n "$devices" ]]; then
  export JAX_PLATFORMS=cpu
  # Replace any device count already in XLA_FLAGS, keep the other flags.
  other_flags="$(sed -E 's/(^| )--xla_force_host_platform_device_count=[0-9]+//g
      s/^ +//' <<<"${XLA_FLAGS:-}")"
  export XLA_FLAGS="${other_flags:+$other_flags }--xla_force_host_platform_device_count=$devices"
fi

if ((processes == 1)); then
  exec "$python" -m bnn_jax.main "$@"
fi

if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

prefix_lines() {  # $1: prefix; line by line, unbuffered
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '%s%s\n' "$1" "$line"
  done
}

pids=()
for ((i = 0; i < processes; i++)); do
  "$python" -m bnn_jax.main --coordinator_address="127.0.0.1:$port" \
      --num_processes="$processes" --process_id="$i" "$@" \
      > >(prefix_lines "[process $i] ") \
      2> >(prefix_lines "[process $i] " >&2) &
  pids+=("$!")
done

status=0
stop_all() {  # $1: signal
  for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null || true; done
}
on_signal() {
  echo "launch/local.sh: forwarding SIGTERM to ${#pids[@]} processes" >&2
  stop_all TERM
}
trap on_signal INT TERM

# Poll (portable to any bash): reap each process as it exits; when one
# fails, ask the others to stop, then kill what is left after the grace.
running=("${pids[@]}")
deadline=""
while ((${#running[@]})); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    code=0
    wait "$pid" || code=$?
    if ((code != 0 && status == 0)); then
      status=$code
      echo "launch/local.sh: process $pid exited with $code; stopping the others" >&2
      stop_all TERM
      deadline=$((SECONDS + grace))
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  if [[ -n "$deadline" ]] && ((SECONDS >= deadline && ${#running[@]})); then
    echo "launch/local.sh: killing ${#running[@]} processes after ${grace}s" >&2
    for pid in "${running[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    deadline=""
  fi
  ((${#running[@]})) && sleep 0.5
done
wait  # the output filters
exit "$status"
