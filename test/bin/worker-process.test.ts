import { describe, expect, it } from 'vitest';
import { createTestDatabase } from '../helpers/database.js';
import { startEntryPoint } from '../helpers/processes.js';

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
