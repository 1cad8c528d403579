// Compiles contracts/src/*.sol with npm `solc` (solcjs) into contracts/out/<Name>.json: the ABI,
// creation and runtime bytecode and the compiler settings. The artifacts are committed (the
// coordinator embeds them); `node contracts/build.mjs --check` recompiles and fails when the
// committed artifacts differ, so the bytecode on main always matches the source.
import { readFileSync, writeFileSync, readdirSync, existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const solc = require('solc');
const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..');
const check = process.argv.includes('--check');

// Source unit names are relative ("src/…", "@openzeppelin/…") so the metadata hash, and with
// it the bytecode, does not depend on where the clone lives.
const sources = {};
for (const file of readdirSync(join(here, 'src')).filter((f) => f.endsWith('.sol')).sort()) {
  sources[`src/${file}`] = { content: readFileSync(join(here, 'src', file), 'utf8') };
}
const settings = {
  optimizer: { enabled: true, runs: 200 },
  // Cancun: every major EVM chain runs it, and so do revm and anvil.
  evmVersion: 'cancun',
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
};
function findImports(path) {
  const candidates = [join(root, 'node_modules', path), join(here, path)];
  for (const candidate of candidates) {
    if (existsSync(candidate)) return { contents: readFileSync(candidate, 'utf8') };
  }
  return { error: `not found: ${path} (run npm ci)` };
}
const output = JSON.parse(
  solc.compile(JSON.stringify({ language: 'Solidity', sources, settings }), { import: findImports }),
);
const errors = (output.errors ?? []).filter((e) => e.severity === 'error');
for (const e of output.errors ?? []) console.error(e.formattedMessage);
if (errors.length > 0) process.exit(1);

let stale = 0;
for (const unit of Object.keys(sources)) {
  for (const [name, contract] of Object.entries(output.contracts[unit])) {
    const artifact = {
      contractName: name,
      sourceName: unit,
      compiler: { version: solc.version(), settings: { optimizer: settings.optimizer, evmVersion: settings.evmVersion } },
      abi: contract.abi,
      bytecode: `0x${contract.evm.bytecode.object}`,
      deployedBytecode: `0x${contract.evm.deployedBytecode.object}`,
    };
    const path = join(here, 'out', `${name}.json`);
    const text = `${JSON.stringify(artifact, null, 2)}\n`;
    if (check) {
      const committed = existsSync(path) ? readFileSync(path, 'utf8') : '';
      if (committed !== text) {
        console.error(`contracts/out/${name}.json is stale: run \`node contracts/build.mjs\` and commit it`);
        stale += 1;
      } else {
        console.log(`contracts/out/${name}.json matches its source`);
      }
    } else {
      writeFileSync(path, text);
      console.log(`wrote contracts/out/${name}.json (${contract.evm.deployedBytecode.object.length / 2} bytes of runtime code)`);
    }
  }
}
process.exit(stale > 0 ? 1 : 0);
