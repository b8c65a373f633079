// The one esbuild configuration for meterbox bundles: ESM for Node 22+, dependencies external, code
// split into shared chunks. Used by scripts/build.mjs (dist/) and the benchmark harness, so the
// benchmark measures exactly the code production runs.
import { build } from 'esbuild';

/**
 * @param {{ in: string, out: string }[]} entryPoints
 * @param {string} outdir
 * @param {import('esbuild').BuildOptions} [extra]
 */
export async function bundle(entryPoints, outdir, extra = {}) {
  await build({
    entryPoints,
    outdir,
    bundle: true,
    packages: 'external',
    platform: 'node',
    format: 'esm',
    target: 'node22',
    sourcemap: true,
    splitting: true,
    chunkNames: 'chunks/[name]-[hash]',
    logLevel: 'warning',
    ...extra,
  });
}
