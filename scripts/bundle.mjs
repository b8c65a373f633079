// The one esbuild configuration for meterbox bundles: ESM for Node 22+, code split into shared
// chunks, dependencies included. Used by scripts/build.mjs (dist/) and the benchmark harness, so the
// benchmark measures exactly the code production runs.
//
// Dependencies are bundled, not left to node_modules: a process that resolves and compiles each
// package's files at start spent 0.376 s of CPU on `node dist/worker.js --help` (every static import,
// then exit), a bundled one 0.173 (medians; docs/benchmarks.md, "Process start"). Every API and
// worker start, and every `meterbox` command, pays it; at a deployment's start it is paid while the
// first requests arrive.
import { build } from 'esbuild';

/**
 * Left to node_modules: pg-native, which pg loads only if asked for (`pg.native`) and meterbox
 * never installs.
 */
const EXTERNAL = ['pg-native'];

/**
 * Bundled CommonJS packages (pg, pino, prom-client) `require` Node's built-ins; an ES module has no
 * `require`, so each output file gets one made for it.
 */
const REQUIRE_SHIM =
  "import { createRequire as __meterboxCreateRequire } from 'node:module';\nconst require = __meterboxCreateRequire(import.meta.url);";

/**
 * @param {{ in: string, out: string }[]} entryPoints
 * @param {string} outdir
 * @param {import('esbuild').BuildOptions} [extra] `banner.js` goes before the require shim (a `#!`
 *   line must stay first)
 */
export async function bundle(entryPoints, outdir, extra = {}) {
  const { banner, ...rest } = extra;
  await build({
    entryPoints,
    outdir,
    bundle: true,
    external: EXTERNAL,
    platform: 'node',
    format: 'esm',
    target: 'node22',
    sourcemap: true,
    splitting: true,
    chunkNames: 'chunks/[name]-[hash]',
    logLevel: 'warning',
    banner: { js: banner?.js ? `${banner.js}\n${REQUIRE_SHIM}` : REQUIRE_SHIM },
    ...rest,
  });
}
