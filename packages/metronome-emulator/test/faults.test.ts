// Injected faults through the real SDK: each kind, latency, seeded repeatability, which endpoints
// they strike, Idempotency-Key answers around them, and the control endpoint (never faulted itself).
import {
  APIConnectionError,
  APIConnectionTimeoutError,
  InternalServerError,
  RateLimitError,
} from '@metronome/sdk';
import { afterEach, describe, expect, it } from 'vitest';
import {
  createPrng,
  type FaultsInput,
  type MetronomeEmulator,
  startMetronomeEmulator,
} from '../src/index.js';
import { apiError, manualClock, reading, rejection, sdk, TEST_TOKEN } from './helpers.js';

const start = Date.UTC(2026, 10, 21, 10, 30, 0);
const clock = manualClock(start);

const started: MetronomeEmulator[] = [];
async function emulator(options: Parameters<typeof startMetronomeEmulator>[0] = {}) {
  const emu = await startMetronomeEmulator({ clock, ...options });
  started.push(emu);
  return emu;
}
afterEach(async () => {
  await Promise.all(started.splice(0).map((e) => e.stop()));
});

const one = (id: string) => ({ usage: [reading(id, 'org-1', start, 2)] });

describe('each fault kind', () => {
  it("aims the faults at the customers named in `customers`: another customer's ingest goes through and draws nothing, so the script strikes the named customer's calls in order", async () => {
    const emu = await emulator({
      faults: { script: ['accepted_then_500', 'error_500'], customers: ['org-f'] },
    });
    const client = sdk(emu, { retries: 0 });
    await client.v1.usage.ingest(one('o-1'));
    const lost = await apiError(() => client.v1.usage.ingest({ usage: [reading('f-1', 'org-f', start, 2)] }));
    expect(lost.status).toBe(500);
    await client.v1.usage.ingest(one('o-2'));
    const refused = await apiError(() =>
      client.v1.usage.ingest({ usage: [reading('f-2', 'org-f', start, 2)] }),
    );
    expect(refused.status).toBe(500);
    expect(emu.events().map((e) => e.transaction_id)).toEqual(['o-1', 'f-1', 'o-2']);
    expect(emu.counters()).toMatchObject({ acceptedThen500: 1, serverError: 1 });
  });

  it('keeps a scripted accepted_then_500 for the next call when its call is refused (a 400: nothing recorded, no answer to lose)', async () => {
    const emu = await emulator({ faults: { script: ['accepted_then_500'] } });
    const client = sdk(emu);
    const refused = await apiError(() =>
      client.v1.usage.ingest({ usage: [reading('r-1', 'org-1', start + 40 * 86_400_000, 2)] }),
    );
    expect(refused.status).toBe(400);
    expect(emu.faults().script).toEqual(['accepted_then_500']);
    const lost = await apiError(() => client.v1.usage.ingest(one('r-2')));
    expect(lost.status).toBe(500);
    expect(emu.events().map((e) => e.transaction_id)).toEqual(['r-2']);
    expect(emu.counters()).toMatchObject({ acceptedThen500: 1, rejected: 1 });
  });

  it('answers 500 without recording anything at errorRate 1', async () => {
    const emu = await emulator({ faults: { errorRate: 1 } });
    const err = await apiError(() => sdk(emu).v1.usage.ingest(one('e-1')));
    expect(err).toBeInstanceOf(InternalServerError);
    expect(err.status).toBe(500);
    expect(err.error).toEqual({ message: 'Internal Server Error' });
    expect(emu.events()).toEqual([]);
    expect(emu.counters().serverError).toBe(1);
  });

  it('answers 503 without recording anything at unavailableRate 1', async () => {
    const emu = await emulator({ faults: { unavailableRate: 1 } });
    const err = await apiError(() => sdk(emu).v1.usage.ingest(one('e-2')));
    expect(err.status).toBe(503);
    expect(emu.events()).toEqual([]);
    expect(emu.counters().unavailable).toBe(1);
  });

  it('answers 429 without recording anything at rateLimitRate 1', async () => {
    const emu = await emulator({ faults: { rateLimitRate: 1 } });
    const err = await apiError(() => sdk(emu).v1.usage.ingest(one('e-3')));
    expect(err).toBeInstanceOf(RateLimitError);
    expect(emu.events()).toEqual([]);
    expect(emu.counters().rateLimited).toBe(1);
  });

  it('resets the connection without an answer; the SDK retries and fails when every attempt is reset', async () => {
    const emu = await emulator({ faults: { resetRate: 1 } });
    const err = await rejection(() => sdk(emu, { retries: 1 }).v1.usage.ingest(one('e-4')));
    expect(err).toBeInstanceOf(APIConnectionError);
    expect(emu.counters().reset).toBe(2);
    expect(emu.events()).toEqual([]);
  });

  it('hangs until the client times out', async () => {
    const emu = await emulator({ faults: { timeoutRate: 1, hangMs: 60_000 } });
    const err = await rejection(() => sdk(emu, { timeout: 200 }).v1.usage.ingest(one('e-5')));
    expect(err).toBeInstanceOf(APIConnectionTimeoutError);
    expect(emu.counters().timeout).toBe(1);
    expect(emu.events()).toEqual([]);
  });

  it('records the events and answers 500 for accepted_then_500; a resend is a duplicate', async () => {
    const emu = await emulator({ faults: { script: ['accepted_then_500'] } });
    const client = sdk(emu);
    const err = await apiError(() => client.v1.usage.ingest(one('e-6')));
    expect(err.status).toBe(500);
    expect(emu.events().map((e) => e.transaction_id)).toEqual(['e-6']);
    expect(emu.counters().acceptedThen500).toBe(1);
    // Delivery resends the same transaction_id: accepted, billed once.
    await client.v1.usage.ingest(one('e-6'));
    expect(emu.events()).toHaveLength(1);
    expect(emu.counters()).toMatchObject({ accepted: 1, duplicate: 1 });
  });

  it("records the events and drops the connection for accepted_then_reset; the SDK's retry is a duplicate", async () => {
    const emu = await emulator({ faults: { script: ['accepted_then_reset'] } });
    await sdk(emu, { retries: 1 }).v1.usage.ingest(one('e-7'));
    expect(emu.events()).toHaveLength(1);
    expect(emu.counters()).toMatchObject({ acceptedThenReset: 1, accepted: 1, duplicate: 1 });
  });

  it('adds the fixed latency, and a random 0..jitter on top', async () => {
    const emu = await emulator({ faults: { latencyMs: 150 } });
    const client = sdk(emu);
    let began = performance.now();
    await client.v1.usage.ingest(one('l-1'));
    expect(performance.now() - began).toBeGreaterThanOrEqual(145);

    // The jitter is the first of each call's two draws from the seeded PRNG: the delays are known.
    emu.setFaults({ jitterMs: 400 }, 11);
    const prng = createPrng(11);
    const expected = [0, 1, 2, 3].map(() => {
      const jitter = Math.floor(prng.next() * 401);
      prng.next();
      return jitter;
    });
    expect(new Set(expected).size).toBeGreaterThan(1);
    for (const [i, delay] of expected.entries()) {
      began = performance.now();
      await client.v1.usage.ingest(one(`j-${i}`));
      expect(performance.now() - began).toBeGreaterThanOrEqual(delay - 5);
    }
  });
});

describe('where faults strike', () => {
  it('strikes ingest only by default, and other endpoints when named', async () => {
    const emu = await emulator({ faults: { errorRate: 1 } });
    const client = sdk(emu);
    await client.v1.customers.create({ name: 'not faulted' });
    await client.v1.billableMetrics.list();
    await client.v1.usage.list({
      starting_on: new Date(start - 3_600_000).toISOString(),
      ending_before: new Date(start).toISOString(),
      window_size: 'HOUR',
    });
    emu.setFaults({ errorRate: 1, endpoints: ['usage', 'customers'] });
    await client.v1.usage.ingest(one('w-1'));
    expect((await apiError(() => client.v1.customers.list())).status).toBe(500);
    expect(
      (
        await apiError(() =>
          client.v1.usage.list({
            starting_on: new Date(start - 3_600_000).toISOString(),
            ending_before: new Date(start).toISOString(),
            window_size: 'HOUR',
          }),
        )
      ).status,
    ).toBe(500);
    expect(emu.counters().serverError).toBe(2);
  });

  it('replays the kept answer of an Idempotency-Key, a lost 500 included, and refuses the key with other parameters', async () => {
    const emu = await emulator({ faults: { endpoints: ['customers'], script: ['accepted_then_500'] } });
    const client = sdk(emu);
    const headers = { 'Idempotency-Key': 'create-acme' };
    const lost = await apiError(() => client.v1.customers.create({ name: 'acme' }, { headers }));
    expect(lost.status).toBe(500);
    expect(emu.customers()).toHaveLength(1);
    // Metronome keeps even the 500 for the key: the retry sees it, and no second customer appears.
    expect((await apiError(() => client.v1.customers.create({ name: 'acme' }, { headers }))).status).toBe(
      500,
    );
    expect(emu.customers()).toHaveLength(1);
    expect(emu.counters().idempotentReplays).toBe(1);
    const other = await apiError(() => client.v1.customers.create({ name: 'other' }, { headers }));
    expect(other.status).toBe(409);
    // A request that never began (validation failed) keeps nothing: the key can be used again.
    const key = { 'Idempotency-Key': 'bad-then-good' };
    expect((await apiError(() => client.v1.customers.create({ name: '' }, { headers: key }))).status).toBe(
      400,
    );
    await client.v1.customers.create({ name: 'good' }, { headers: key });
    expect(emu.customers().map((c) => c.name)).toEqual(['acme', 'good']);
  });
});

describe('seeded repeatability', () => {
  const mix: FaultsInput = { errorRate: 0.3, rateLimitRate: 0.2, acceptedThen500Rate: 0.1 };

  async function outcomes(emu: MetronomeEmulator, prefix: string): Promise<string[]> {
    const client = sdk(emu);
    const seen: string[] = [];
    for (let i = 0; i < 40; i++) {
      try {
        await client.v1.usage.ingest(one(`${prefix}-${i}`));
        seen.push('ok');
      } catch (err) {
        seen.push(String((err as { status?: number }).status));
      }
    }
    return seen;
  }

  it('repeats the same faults for the same seed and calls', async () => {
    const a = await outcomes(await emulator({ seed: 42, faults: mix }), 'a');
    const b = await outcomes(await emulator({ seed: 42, faults: mix }), 'b');
    const c = await outcomes(await emulator({ seed: 7, faults: mix }), 'c');
    expect(a).toEqual(b);
    expect(a).not.toEqual(c);
    expect(new Set(a)).toEqual(new Set(['ok', '500', '429']));
  });

  it('restarts the sequence when faults are set again with the seed', async () => {
    const emu = await emulator({ seed: 3, faults: mix });
    const first = await outcomes(emu, 'x');
    emu.setFaults(mix, 3);
    expect(await outcomes(emu, 'y')).toEqual(first);
  });
});

describe('control endpoint', () => {
  it('sets faults at run time and never faults itself', async () => {
    const emu = await emulator();
    const set = await fetch(`${emu.url}/_emulator/faults`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ unavailableRate: 1, seed: 9 }),
    });
    expect(set.status).toBe(200);
    expect(((await set.json()) as { faults: { unavailableRate: number }; seed: number }).seed).toBe(9);
    expect((await apiError(() => sdk(emu).v1.usage.ingest(one('c-1')))).status).toBe(503);
    expect((await fetch(`${emu.url}/_emulator/state`)).status).toBe(200);
    const current = (await (await fetch(`${emu.url}/_emulator/faults`)).json()) as {
      faults: { unavailableRate: number; endpoints: string[] };
    };
    expect(current.faults).toMatchObject({ unavailableRate: 1, endpoints: ['ingest'] });
  });

  it('rejects fault settings that do not make sense', async () => {
    const emu = await emulator();
    for (const body of [{ errorRate: 0.8, resetRate: 0.5 }, { endpoints: ['nowhere'] }, { latencyMs: -1 }]) {
      const response = await fetch(`${emu.url}/_emulator/faults`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      expect(response.status).toBe(400);
    }
    expect(emu.faults().errorRate).toBe(0);
    // The API itself still answers normally.
    const ok = await fetch(`${emu.url}/v1/billable-metrics`, {
      headers: { authorization: `Bearer ${TEST_TOKEN}` },
    });
    expect(ok.status).toBe(200);
  });
});
