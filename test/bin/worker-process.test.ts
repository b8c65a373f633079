import { describe, expect, it } from 'vitest';
import { createTestDatabase } from '../support/database.js';
import { startEntryPoint } from '../support/processes.js';

describe('worker process', () => {
  it('starts pg-boss, then exits 0 on SIGTERM within the shutdown deadline', async () => {
    const url = await createTestDatabase();
    const worker = startEntryPoint('worker', { DATABASE_URL: url, SHUTDOWN_TIMEOUT_MS: '10000' });
    await worker.waitForOutput('worker started');
    const started = Date.now();
    worker.kill('SIGTERM');
    const result = await worker.exited;
    expect(result.code).toBe(0);
    expect(result.stdout).toContain('worker stopped');
    expect(Date.now() - started).toBeLessThan(15_000);
  });

  it('exits 0 on SIGINT too', async () => {
    const url = await createTestDatabase();
    const worker = startEntryPoint('worker', { DATABASE_URL: url });
    await worker.waitForOutput('worker started');
    worker.kill('SIGINT');
    expect((await worker.exited).code).toBe(0);
  });
});

describe('API process', () => {
  it('serves readiness and exits 0 on SIGTERM', async () => {
    const url = await createTestDatabase();
    const api = startEntryPoint('server', { DATABASE_URL: url, PORT: '0' });
    await api.waitForOutput('meterbox API listening');
    const address = /"url":"(http:\/\/[^"]+)"/.exec(api.stdout)?.[1];
    expect(address).toBeDefined();
    const res = await fetch(`${address}/readyz`);
    expect(res.status).toBe(200);
    api.kill('SIGTERM');
    expect((await api.exited).code).toBe(0);
  });
});

describe('bounded heap (HEAP_OLD_SPACE_MB / HEAP_YOUNG_SPACE_MB)', () => {
  const heapLimit = async (env: Record<string, string>) => {
    const url = await createTestDatabase();
    const api = startEntryPoint('server', { DATABASE_URL: url, PORT: '0', ...env });
    await api.waitForOutput('meterbox API listening');
    const address = /"url":"(http:\/\/[^"]+)"/.exec(api.stdout)?.[1];
    const text = await (await fetch(`${address}/metrics`)).text();
    api.kill('SIGTERM');
    expect((await api.exited).code).toBe(0);
    const value = /^meterbox_heap_limit_bytes (\d+)/m.exec(text)?.[1];
    expect(value).toBeDefined();
    return Number(value) / 2 ** 20;
  };

  it('serves from a thread whose heap has the configured limits, and still shuts down on SIGTERM', async () => {
    const bounded = await heapLimit({ HEAP_OLD_SPACE_MB: '200', HEAP_YOUNG_SPACE_MB: '16' });
    // old generation + young generation (V8 adds its semi-space copy reserve to the young part)
    expect(bounded).toBeGreaterThanOrEqual(200);
    expect(bounded).toBeLessThanOrEqual(200 + 3 * 16);
    const unbounded = await heapLimit({ HEAP_OLD_SPACE_MB: '0' });
    expect(unbounded).not.toBe(bounded);
  });

  it('a fatal start-up error inside the thread still exits 1 with the reason', async () => {
    const worker = startEntryPoint('worker', { DATABASE_URL: 'postgres://nobody@127.0.0.1:1/none' });
    const result = await worker.exited;
    expect(result.code).toBe(1);
    expect(result.stderr).toContain('meterbox: fatal:');
  });
});
