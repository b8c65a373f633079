// Bundles each entry point in src/bin to dist/<name>.js (dependencies stay external), so the
// production commands are `node dist/server.js`, `node dist/worker.js`, `node dist/migrate.js`.
import { readdirSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { bundle } from './bundle.mjs';

const entryPoints = readdirSync('src/bin')
  .filter((f) => f.endsWith('.ts') && f !== 'process.ts')
  .map((f) => ({ in: `src/bin/${f}`, out: f.replace(/\.ts$/, '') }));

await rm('dist', { recursive: true, force: true });
await bundle(entryPoints, 'dist', { banner: { js: '#!/usr/bin/env node' } });
console.log(`built ${entryPoints.map((e) => `dist/${e.out}.js`).join(', ')}`);
