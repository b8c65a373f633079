// What only Metronome does, against its emulator through the real @metronome/sdk (what every
// transport does is the conformance suite's, transport-conformance/): a correction is always a
// negative event under its own transaction_id (Metronome cannot void), and the account's billable
// metrics and customer alias are found or created idempotently.
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
  // Up to 100 events a call, values as strings, accepted-then-500 billed once, 429 and resets, a
  // refused call resent event by event: the transport conformance suite (transport-conformance/metronome.test.ts).
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
