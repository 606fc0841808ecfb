#!/usr/bin/env bash
# Runs bnn_jax on every worker of a Cloud TPU VM (a single host or a pod
# slice): copies this checkout to each worker, creates the virtual
# environment there, and starts the same `python -m bnn_jax.main` on all
# workers at once (one process per host, joined by jax.distributed).
# See docs/scaling.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --tpu=NAME --zone=ZONE [options] -- <bnn_jax.main flags>

  --tpu=NAME        the TPU VM (created beforehand with
                    `gcloud compute tpus tpu-vm create`).
  --zone=ZONE       its zone, e.g. us-central2-b.
  --project=ID      Google Cloud project (default: gcloud's configured one).
  --dir=PATH        checkout directory on the workers, absolute or
                    relative to the remote home (default: bnn_jax).
  --setup           (re)create the virtual environment on every worker even
                    if one exists (done automatically where it is missing).
  --remote_python=P interpreter that creates the environment on the workers
                    (default: python3); it must be Python >= 3.11 with venv
                    (e.g. `sudo apt-get install python3.11-venv` and
                    --remote_python=python3.11 on an Ubuntu 22.04 image).
  --internal-ip     reach the workers by their internal IPs (from a VM in
                    the same VPC).
  -h, --help        this text.

The bnn_jax.main flags must name storage that every worker sees at the same
path: --config.dataset.data_dir may be a gs:// bucket (TFDS reads it
directly); --workdir must be a shared file system mounted on every worker
(Filestore/NFS, or a bucket mounted with gcsfuse), since checkpoints and
logs are written with file APIs and resumed from there.

Example:
  launch/tpu_pod.sh --tpu=my-v4-32 --zone=us-central2-b -- \
      --config=configs/adambnn_imagenet.py \
      --config.dataset.data_dir=gs://my-bucket/tensorflow_datasets \
      --config.phases.teacher.init_from=/mnt/shared/resnet34 \
      --workdir=/mnt/shared/runs/adambnn

Re-running the same command resumes from the latest checkpoint (e.g. after a
preemption). The exit status is gcloud's (non-zero if any worker failed).
EOF
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tpu=""
zone=""
project=""
remote_dir="bnn_jax"
remote_python="python3"
setup=0
gcloud_flags=()
while (($#)); do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --dir=*) remote_dir="${1#*=}" ;;
    --setup) setup=1 ;;
    --remote_python=*) remote_python="${1#*=}" ;;
    --internal-ip) gcloud_flags+=("--internal-ip") ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch/tpu_pod.sh: unknown option $1 (flags for bnn_jax.main go after --)" >&2
       usage >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "launch/tpu_pod.sh: --tpu and --zone are required" >&2
  usage >&2; exit 2
fi
if (($# == 0)); then
  echo "launch/tpu_pod.sh: no bnn_jax.main flags after --" >&2
  usage >&2; exit 2
fi
if ! command -v gcloud >/dev/null; then
  echo "launch/tpu_pod.sh: gcloud not found; install the Google Cloud CLI" >&2
  exit 2
fi
gcloud_flags+=("--zone=$zone")
if [[ -n "$project" ]]; then gcloud_flags+=("--project=$project"); fi

# The JAX release of requirements.txt, with its TPU runtime (libtpu).
jax_version="$(sed -n 's/^jax==\([0-9.]*\)$/\1/p' "$repo/requirements.txt")"
if [[ -z "$jax_version" ]]; then
  echo "launch/tpu_pod.sh: no jax==X.Y.Z pin in requirements.txt" >&2; exit 2
fi

on_all_workers() {  # $1: a shell command for every worker
  gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" --worker=all \
      --command="$1"
}

# 1. Ship the working tree: tracked and untracked files, committed or not,
# without what .gitignore names (.venv, work directories).
tarball="$(mktemp "${TMPDIR:-/tmp}/bnn_jax.XXXXXX.tar.gz")"
trap 'rm -f "$tarball"' EXIT
git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | tar -czf "$tarball" -C "$repo" --null -T -
echo "launch/tpu_pod.sh: copying $repo to $tpu:~/$remote_dir on all workers" >&2
gcloud compute tpus tpu-vm scp "$tarball" "$tpu:bnn_jax_checkout.tar.gz" \
    "${gcloud_flags[@]}" --worker=all
q_dir="$(printf '%q' "$remote_dir")"
on_all_workers "set -e; mkdir -p $q_dir; tar -xzf bnn_jax_checkout.tar.gz -C $q_dir; rm bnn_jax_checkout.tar.gz"

# 2. The virtual environment: requirements.txt plus JAX's TPU runtime.
q_py="$(printf '%q' "$remote_python")"
check_python="$q_py -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo \"\$(hostname): $q_py is not Python >= 3.11; pass --remote_python=python3.11\" >&2; exit 1; }"
install="$check_python; $q_py -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -r requirements.txt && .venv/bin/pip install -q 'jax[tpu]==$jax_version'"
if ((setup)); then
  on_all_workers "set -e; cd $q_dir; rm -rf .venv; $install"
else
  on_all_workers "set -e; cd $q_dir; [ -x .venv/bin/python ] || { $install; }"
fi

# 3. The same command on every worker; --distributed=on: JAX reads the pod
# layout from the TPU metadata server.
args=""
for arg in "$@"; do args+=" $(printf '%q' "$arg")"; done
echo "launch/tpu_pod.sh: running bnn_jax.main on all workers of $tpu" >&2
on_all_workers "cd $q_dir && TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m bnn_jax.main --distributed=on$args"
