#!/usr/bin/env bash
# Copies mamba_ssm's Triton SSD (pure Python + Triton) from a checkout of state-spaces/mamba into
# the ignored folder .peer/, where benchmarks/peers.py imports it to time it against our kernels.
# It is a measurement anchor only: never committed, never imported by the project itself.
#
#   bash scripts/prepare_peers.sh MAMBA_REPO     # a git checkout or bare mirror of state-spaces/mamba
#
# Downloads nothing: get the repository first (git clone https://github.com/state-spaces/mamba, or
# any mirror of it). Copies only the files that `mamba_chunk_scan_combined` imports (the SSD
# kernels, the gated norm and activation kernels that ssd_combined.py imports at load time, two
# small utils) plus the licence, and records the commit in .peer/SOURCE.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?usage: bash scripts/prepare_peers.sh MAMBA_REPO (a checkout or mirror of state-spaces/mamba)}
FILES=(
  mamba_ssm/ops/triton/ssd_combined.py
  mamba_ssm/ops/triton/ssd_bmm.py
  mamba_ssm/ops/triton/ssd_chunk_scan.py
  mamba_ssm/ops/triton/ssd_chunk_state.py
  mamba_ssm/ops/triton/ssd_state_passing.py
  mamba_ssm/ops/triton/layernorm_gated.py
  mamba_ssm/ops/triton/k_activations.py
  mamba_ssm/ops/triton/softplus.py
  mamba_ssm/utils/torch.py
  mamba_ssm/utils/determinism.py
  LICENSE
)
rm -rf .peer/mamba_ssm
mkdir -p .peer
if git -C "$SRC" rev-parse --verify -q HEAD >/dev/null; then
  # A checkout or a bare mirror: read the committed files (no work tree needed).
  commit=$(git -C "$SRC" rev-parse HEAD)
  for f in "${FILES[@]}"; do
    mkdir -p ".peer/$(dirname "$f")"
    git -C "$SRC" show "HEAD:$f" > ".peer/$f"
  done
else
  commit="unknown (not a git repository)"
  for f in "${FILES[@]}"; do
    mkdir -p ".peer/$(dirname "$f")"
    cp "$SRC/$f" ".peer/$f"
  done
fi
mv .peer/LICENSE .peer/mamba_ssm/LICENSE
printf 'state-spaces/mamba %s\ncopied from %s on %s by scripts/prepare_peers.sh\n' \
  "$commit" "$SRC" "$(date -u +%Y-%m-%d)" > .peer/SOURCE
grep -qxF '.peer/' .gitignore 2>/dev/null || echo "warning: .peer/ is not in .gitignore" >&2
echo "mamba_ssm Triton SSD ($commit) -> .peer/mamba_ssm ($(du -sh .peer | cut -f1))"
