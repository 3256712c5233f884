#!/usr/bin/env bash
# README command 1: compress the shipped real base/fine-tuned pair with Delta-CoMe and the
# baselines at alpha = 1/16 and print the quality/size table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/python -m deltacome_ao.evaluation.compare "$@"
