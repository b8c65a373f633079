// The Metronome transport against the emulator through the real @metronome/sdk, and what the rules
// make of its answers: a refused call never settles an event as delivered or expired, a 400 of several
// events is resent event by event so one bad event does not fail its neighbours, a repeat after
// "accepted, then 500" is ignored by Metronome (billed once), and a correction is always a negative
// event under its own transaction_id (Metronome cannot void).
import { type MetronomeEmulator, startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { sdk } from '@meterbox/metronome-emulator/testing';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { sendCorrection } from '../../src/metering/corrections.js';
import {
  createMetronomeCorrectionClient,
  createMetronomeTransport,
  ensureBillableMetrics,
  ensureCustomer,
  metronomeAlias,
} from '../../src/metering/metronome.js';
import { meaningOf } from '../../src/metering/rules.js';
import type { MeterEventInput } from '../../src/metering/stripe-meter.js';

const emulator: MetronomeEmulator = await startMetronomeEmulator({ seed: 3 });
afterAll(() => emulator.stop());
const client = sdk(emulator);
const transport = createMetronomeTransport(client);

beforeEach(() => {
  emulator.reset();
  emulator.setFaults({});
});

let n = 0;
const event = (over: Partial<MeterEventInput> = {}): MeterEventInput => ({
  eventName: 'temperature_readings',
  customerId: metronomeAlias('00000000-0000-4000-8000-000000000001'),
  value: '3',
  timestamp: new Date(Date.now() - 60_000),
  identifier: `mb_mtr_${++n}_test`,
  ...over,
});

describe('Metronome transport', () => {
  it('sends up to 100 events in one ingest call, each accepted, values as strings', async () => {
    const events = Array.from({ length: 100 }, () => event());
    const outcomes = await transport.send(events);
    expect(outcomes).toEqual(events.map(() => ({ kind: 'accepted' })));
    expect(emulator.counters().calls.ingest).toBe(1);
    expect(emulator.events()).toHaveLength(100);
    expect(emulator.events()[0]!.properties.value).toBe('3');
    await expect(transport.send([...events, event()])).rejects.toThrow(/at most 100/);
  });

  it('bills once when Metronome records the events and then answers 500: the resend is ignored as a repeat', async () => {
    emulator.setFaults({ script: ['accepted_then_500'] });
    const events = [event(), event()];
    const first = await transport.send(events);
    expect(first.map((o) => [o.kind, o.scope])).toEqual([
      ['retryable', 'call'],
      ['retryable', 'call'],
    ]);
    // A whole-call 500 never reads as delivered.
    expect(first.map((o) => meaningOf(o, { validating: false }).kind)).toEqual(['retry', 'retry']);
    const again = await transport.send(events);
    expect(again.map((o) => meaningOf(o, { validating: false }))).toEqual([
      { kind: 'delivered', duplicate: false },
      { kind: 'delivered', duplicate: false },
    ]);
    expect(emulator.events()).toHaveLength(2);
    expect(emulator.duplicates()).toHaveLength(2);
  });

  it('answers a 429 as rate limited and a reset as a retry, for every event of the call', async () => {
    emulator.setFaults({ script: ['rate_limit_429', 'reset'] });
    const limited = await transport.send([event(), event()]);
    expect(limited.map((o) => meaningOf(o, { validating: false }).kind)).toEqual([
      'rate_limited',
      'rate_limited',
    ]);
    const reset = await transport.send([event(), event()]);
    expect(reset.map((o) => meaningOf(o, { validating: false }).kind)).toEqual(['retry', 'retry']);
    expect(emulator.events()).toHaveLength(0);
  });

  it('resends a refused call event by event: the old event expires, the bad one fails, the others are delivered', async () => {
    const old = event({ timestamp: new Date(Date.now() - 35 * 86_400_000) });
    const good = [event(), event()];
    const bad = event({ customerId: '' });
    const outcomes = await transport.send([good[0]!, old, bad, good[1]!]);
    expect(outcomes.map((o) => meaningOf(o, { validating: false }).kind)).toEqual([
      'delivered',
      'expired',
      'failed',
      'delivered',
    ]);
    // 1 refused call + 4 single-event calls; only the good events were recorded.
    expect(emulator.counters().calls.ingest).toBe(5);
    expect(
      emulator
        .events()
        .map((e) => e.transaction_id)
        .sort(),
    ).toEqual(good.map((e) => e.identifier).sort());
  });

  it('takes a correction back with a negative event under its own transaction_id (Metronome cannot void)', async () => {
    const corrections = createMetronomeCorrectionClient(client);
    const original = event({ value: '10' });
    await transport.send([original]);
    const outcome = await sendCorrection(
      corrections,
      async () => {},
      original.customerId,
      'temperature_readings',
      {
        identifier: 'mb_mtrc_1_test',
        // Even a group claimed as a cancel becomes a compensation: the cancel is refused as impossible.
        action: 'cancel',
        originalIdentifier: original.identifier,
        value: '4',
        timestamp: original.timestamp,
        rows: 1,
        oldestCreatedAt: new Date(),
        attempts: 0,
        identifiedAt: new Date(),
      },
      () => 5_000,
    );
    expect(outcome).toEqual({ kind: 'accepted', action: 'compensate' });
    const sums = emulator.events().map((e) => [e.transaction_id, e.properties.value]);
    expect(sums).toEqual([
      [original.identifier, '10'],
      ['mb_mtrc_1_test', '-4'],
    ]);
    const total = emulator.totals().reduce((s, t) => s + (t.sums.value ?? 0), 0);
    expect(total).toBe(6);
  });
});

describe('Metronome account', () => {
  it('finds or creates the billable metrics and the customer alias idempotently', async () => {
    emulator.reset({ customers: true, billableMetrics: true });
    const first = await ensureBillableMetrics(client);
    expect(first.map((m) => [m.eventName, m.created])).toEqual([
      ['temperature_readings', false],
      ['active_sensors', false],
    ]);
    const org = { id: '00000000-0000-4000-8000-0000000000aa', name: 'Cold Chain' };
    const created = await ensureCustomer(client, org);
    const again = await ensureCustomer(client, org);
    expect(created.created).toBe(true);
    expect(again).toEqual({ id: created.id, created: false });
    expect(emulator.customers().find((c) => c.id === created.id)?.ingest_aliases).toEqual([
      metronomeAlias(org.id),
    ]);
  });
});
