// Rate limits on the emulator's clock: Metronome's documented ingest budget is in events per second
// (5,000 by default), so a call of 100 events takes 100 of it; a call-rate cap is optional.
import { RateLimitError } from '@metronome/sdk';
import { afterEach, describe, expect, it } from 'vitest';
import { DEFAULT_EVENTS_PER_SECOND, type MetronomeEmulator, startMetronomeEmulator } from '../src/index.js';
import { apiError, manualClock, reading, sdk } from './helpers.js';

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
  clock.set(start);
});

const batch = (n: number, prefix: string) => ({
  usage: Array.from({ length: n }, (_, i) => reading(`${prefix}-${i}`, 'org-1', start)),
});

describe('events per second', () => {
  it("defaults to an account's default 5,000 events/s", async () => {
    const emu = await emulator();
    const state = (await (await fetch(`${emu.url}/_emulator/state`)).json()) as {
      limits: { eventsPerSecond: number; ingestRequestsPerSecond: number | null };
    };
    expect(state.limits).toMatchObject({
      eventsPerSecond: DEFAULT_EVENTS_PER_SECOND,
      ingestRequestsPerSecond: null,
    });
    expect(DEFAULT_EVENTS_PER_SECOND).toBe(5_000);
  });

  it('answers 429 to the call that would exceed the budget, records none of it, and recovers after a second', async () => {
    const emu = await emulator({ eventsPerSecond: 150 });
    const client = sdk(emu);
    await client.v1.usage.ingest(batch(100, 'a'));
    const err = await apiError(() => client.v1.usage.ingest(batch(51, 'b')));
    expect(err).toBeInstanceOf(RateLimitError);
    expect(emu.events()).toHaveLength(100);
    // 50 still fit in this second.
    await client.v1.usage.ingest(batch(50, 'c'));
    expect((await apiError(() => client.v1.usage.ingest(batch(1, 'd')))).status).toBe(429);
    clock.advance(999);
    expect((await apiError(() => client.v1.usage.ingest(batch(1, 'e')))).status).toBe(429);
    clock.advance(1);
    await client.v1.usage.ingest(batch(100, 'f'));
    expect(emu.events()).toHaveLength(250);
    expect(emu.counters().rateLimited).toBe(3);
  });

  it("lets the SDK's own retry get through once the second has passed", async () => {
    const emu = await emulator({ eventsPerSecond: 1, clock: Date.now });
    const client = sdk(emu, { retries: 2 });
    await client.v1.usage.ingest(batch(1, 'x'));
    // Refused at first; the SDK backs off (about 0.5 s, then 1 s) and retries within the budget.
    await client.v1.usage.ingest(batch(1, 'y'));
    expect(emu.events()).toHaveLength(2);
    expect(emu.counters().rateLimited).toBeGreaterThanOrEqual(1);
  });
});

describe('calls per second', () => {
  it('caps ingest calls when configured, whatever their size', async () => {
    const emu = await emulator({ ingestRequestsPerSecond: 2 });
    const client = sdk(emu);
    await client.v1.usage.ingest(batch(1, 'a'));
    await client.v1.usage.ingest(batch(1, 'b'));
    expect((await apiError(() => client.v1.usage.ingest(batch(1, 'c')))).status).toBe(429);
    clock.advance(1000);
    await client.v1.usage.ingest(batch(1, 'd'));
    expect(emu.events().map((e) => e.transaction_id)).toEqual(['a-0', 'b-0', 'd-0']);
  });
});
