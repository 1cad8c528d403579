#!/usr/bin/env bash
# The credit contract's checks: the committed artifact (contracts/out/) must be what npm solc
# makes of the source, and the forge tests (unit, fuzz, gas) must pass. Offline; needs `npm ci`.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x ../node_modules/.bin/forge ] || [ ! -d ../node_modules/solc ]; then
  echo "contracts/test.sh: forge or solc is missing: run \`npm ci\` in the repository root" >&2
  exit 1
fi
node build.mjs --check
../node_modules/.bin/forge test
