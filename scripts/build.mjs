// Bundles each entry point in src/bin to dist/<name>.js (dependencies stay external), so the
// production commands are `node dist/server.js`, `node dist/worker.js`, `node dist/migrate.js`.
// `--production` bundles only what production runs (no dev mode, no Stripe emulator: the Docker
// image's build); `--outdir DIR` writes elsewhere than dist/.
import { readdirSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { bundle } from './bundle.mjs';

/** Entry points that exist for development only: never shipped in the production image. */
export const DEV_ENTRIES = ['dev'];

const { values } = parseArgs({
  options: { production: { type: 'boolean', default: false }, outdir: { type: 'string', default: 'dist' } },
});
const entryPoints = readdirSync('src/bin')
  .filter((f) => f.endsWith('.ts') && f !== 'process.ts')
  .map((f) => ({ in: `src/bin/${f}`, out: f.replace(/\.ts$/, '') }))
  .filter((e) => !values.production || !DEV_ENTRIES.includes(e.out));

await rm(values.outdir, { recursive: true, force: true });
await bundle(entryPoints, values.outdir, { banner: { js: '#!/usr/bin/env node' } });
console.log(`built ${entryPoints.map((e) => `${values.outdir}/${e.out}.js`).join(', ')}`);
