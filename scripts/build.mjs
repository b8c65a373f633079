// Bundles each entry point in src/bin to dist/<name>.js (dependencies included), so the
// production commands are `node dist/server.js`, `node dist/worker.js`, `node dist/migrate.js`.
// `--production` bundles only what production runs (no dev mode, no Stripe emulator: the Docker
// image's build); `--outdir DIR` writes elsewhere than dist/.
import { readdirSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { bundle } from './bundle.mjs';

/** Entry points that exist for development only: never shipped in the production image. */
export const DEV_ENTRIES = ['dev'];

const { values } = parseArgs({
  options: { production: { type: 'boolean', default: false }, outdir: { type: 'string', default: 'dist' } },
});
// Modules of src/bin shared by the entry points, not entry points themselves.
const PLUMBING = new Set(['process.ts']);
const entryPoints = readdirSync('src/bin')
  .filter((f) => f.endsWith('.ts') && !PLUMBING.has(f))
  .map((f) => ({ in: `src/bin/${f}`, out: f.replace(/\.ts$/, '') }))
  .filter((e) => !values.production || !DEV_ENTRIES.includes(e.out));

/**
 * The workspace packages (packages/*, e.g. @meterbox/stripe-emulator) ship TypeScript source that
 * plain node cannot load, so a bundle that uses one carries its code instead of importing it; their
 * own dependencies stay external like everyone else's.
 * @type {import('esbuild').Plugin}
 */
const inlineWorkspacePackages = {
  name: 'inline-workspace-packages',
  setup(build) {
    build.onResolve({ filter: /^@meterbox\// }, (args) => ({
      path: fileURLToPath(import.meta.resolve(args.path)),
    }));
  },
};

await rm(values.outdir, { recursive: true, force: true });
await bundle(entryPoints, values.outdir, {
  banner: { js: '#!/usr/bin/env node' },
  plugins: [inlineWorkspacePackages],
});
console.log(`built ${entryPoints.map((e) => `${values.outdir}/${e.out}.js`).join(', ')}`);
