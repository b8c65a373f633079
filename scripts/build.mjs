// Bundles each entry point in src/bin to dist/<name>.js (dependencies stay external), so the
// production commands are `node dist/server.js`, `node dist/worker.js`, `node dist/migrate.js`.
import { readdirSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { build } from 'esbuild';

const entryPoints = readdirSync('src/bin')
  .filter((f) => f.endsWith('.ts') && f !== 'process.ts')
  .map((f) => ({ in: `src/bin/${f}`, out: f.replace(/\.ts$/, '') }));

await rm('dist', { recursive: true, force: true });
await build({
  entryPoints,
  outdir: 'dist',
  bundle: true,
  packages: 'external',
  platform: 'node',
  format: 'esm',
  target: 'node22',
  sourcemap: true,
  splitting: true,
  chunkNames: 'chunks/[name]-[hash]',
  banner: { js: '#!/usr/bin/env node' },
  logLevel: 'warning',
});
console.log(`built ${entryPoints.map((e) => `dist/${e.out}.js`).join(', ')}`);
