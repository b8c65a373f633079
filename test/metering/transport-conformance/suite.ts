// One conformance suite for every destination transport (River's riverdrivertest is the model):
// each transport's file calls `transportConformance` with a driver that starts the destination's
// emulator and builds the transport on it; the suite asks the same questions of every one, a
// describe block per concern, and reads the answers through rules/answers.ts `meaningOf`, as delivery does.
// What only one transport does (v2 sessions, Metronome's corrections) stays in that transport's file.
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { MeterEventName } from '../../../src/db/schema.js';
import { meaningOf } from '../../../src/metering/rules/answers.js';
import type { MeterEventInput, SendOutcome } from '../../../src/metering/stripe-meter.js';
import type { MeterTransport } from '../../../src/metering/transport.js';

/** The faults both emulators can script, by their shared names. */
export type ScriptedFault =
  | 'error_500'
  | 'rate_limit_429'
  | 'reset'
  | 'timeout'
  | 'accepted_then_500'
  | 'accepted_then_reset';

/** An event as the destination holds it (whatever its wire format). */
export interface HeldEvent {
  identifier: string;
  customerId: string;
  eventName: string;
  /** As the destination keeps it (Stripe: a number; Metronome: the string sent). */
  value: unknown;
  /** Seconds since the epoch. */
  timestamp: number;
}

export interface TransportDriver {
  /** A new transport on the destination with valid credentials (a new v2 session, say). */
  transport(): MeterTransport;
  /** A transport whose credentials the destination refuses. */
  badCredentials(): MeterTransport;
  /** How far back the destination takes an event's timestamp. */
  pastWindowMs: number;
  /**
   * True where a 200 means "received, validated later" (the v2 stream): an accepted event is not
   * yet delivered, and an event too old is refused in a later error report, not in the answer.
   */
  validating: boolean;
  /** The value as the destination holds it, from the decimal string sent. */
  heldValue(sent: string): unknown;
  /** Forgets every event, identifier and counter, and scripts no fault. */
  reset(): void;
  /** The next calls meet these faults, in order (`retryAfterSeconds` on a 429, `hangMs` of a timeout). */
  script(faults: ScriptedFault[], options?: { retryAfterSeconds?: number; hangMs?: number }): void;
  /** Every event the destination billed (a repeat ignored by its dedupe is not one). */
  held(): HeldEvent[];
  /** Events of accepted calls refused afterwards (an error report's identifiers and codes). */
  refusedLater(): { identifier: string | null; code: string }[];
  /** Calls to the meter-event endpoint since the last reset, whatever their answer. */
  calls(): number;
  stop(): Promise<void>;
}

/** A driver's reset and script on an emulator (both emulators take the same fault settings). */
export function emulatorFaults(emulator: {
  reset(): void;
  setFaults(faults: { script?: ScriptedFault[]; retryAfterSeconds?: number; hangMs?: number }): unknown;
}): Pick<TransportDriver, 'reset' | 'script'> {
  return {
    reset: () => {
      emulator.reset();
      emulator.setFaults({});
    },
    script: (script, more = {}) => emulator.setFaults({ script, ...more }),
  };
}

let n = 0;
/** A valid event of its own customer and identifier, timestamped a minute ago in whole seconds. */
export function conformanceEvent(over: Partial<MeterEventInput> = {}): MeterEventInput {
  n += 1;
  return {
    eventName: 'temperature_readings',
    customerId: `cus_conformance_${n}`,
    value: String(n),
    timestamp: new Date(Math.floor((Date.now() - 60_000) / 1000) * 1000),
    identifier: `mb_conformance_${process.pid}_${n}`,
    ...over,
  };
}

/** An event refused for its content: no event name (a shape every destination checks at once). */
const badEvent = () => conformanceEvent({ eventName: undefined as unknown as MeterEventName });

/** Sends the events as delivery does: no call carries more than the transport's maxEventsPerCall. */
async function sendAll(transport: MeterTransport, events: readonly MeterEventInput[]) {
  const out: SendOutcome[] = [];
  for (let i = 0; i < events.length; i += transport.maxEventsPerCall) {
    out.push(...(await transport.send(events.slice(i, i + transport.maxEventsPerCall))));
  }
  return out;
}

export function transportConformance(name: string, start: () => Promise<TransportDriver>): void {
  describe(`${name} transport conformance`, () => {
    let d: TransportDriver;
    beforeAll(async () => {
      d = await start();
    });
    afterAll(() => d?.stop());
    beforeEach(() => d.reset());
    const meaning = (o: SendOutcome) => meaningOf(o, { validating: d.validating });
    const billed = (identifier: string) => d.held().filter((e) => e.identifier === identifier).length;
    /** As many events as one call carries, up to 3 (v1: 1). */
    const callOf = () =>
      Array.from({ length: Math.min(3, d.transport().maxEventsPerCall) }, () => conformanceEvent());

    describe('accepted', () => {
      it('records each event once with its identifier, customer, meter, value and whole-second timestamp', async () => {
        const events = [conformanceEvent(), conformanceEvent({ eventName: 'active_sensors', value: '7' })];
        const outcomes = await sendAll(d.transport(), events);
        expect(outcomes.map((o) => o.kind)).toEqual(['accepted', 'accepted']);
        expect(outcomes.map((o) => meaning(o).kind)).toEqual(
          events.map(() => (d.validating ? 'accepted' : 'delivered')),
        );
        for (const e of events) {
          expect(d.held().filter((h) => h.identifier === e.identifier)).toEqual([
            {
              identifier: e.identifier,
              customerId: e.customerId,
              eventName: e.eventName,
              value: d.heldValue(e.value),
              timestamp: e.timestamp.getTime() / 1000,
            },
          ]);
        }
      });

      it('carries up to maxEventsPerCall events in one call and answers each; a batching transport refuses one more before any call', async () => {
        const transport = d.transport();
        const events = Array.from({ length: transport.maxEventsPerCall }, () => conformanceEvent());
        const outcomes = await transport.send(events);
        expect(outcomes).toEqual(events.map(() => ({ kind: 'accepted' })));
        expect(d.calls()).toBe(1);
        expect(d.held()).toHaveLength(events.length);
        if (transport.maxEventsPerCall > 1) {
          await expect(transport.send([...events, conformanceEvent()])).rejects.toThrow(/at most/);
          expect(d.calls()).toBe(1);
        }
        expect(await transport.send([])).toEqual([]);
      });
    });

    describe('the same identifier again', () => {
      it('is delivered (a duplicate or an ignored repeat), never billed twice', async () => {
        const transport = d.transport();
        const event = conformanceEvent();
        await transport.send([event]);
        const again = await transport.send([event]);
        expect(again[0]?.kind).toMatch(/^(duplicate|accepted)$/);
        expect(meaning(again[0]!).kind).toBe(d.validating ? 'accepted' : 'delivered');
        expect(billed(event.identifier)).toBe(1);
      });

      it('after "accepted, then 500": the first answer is a retry, the resend settles it, billed once', async () => {
        const transport = d.transport();
        const events = callOf();
        d.script(['accepted_then_500']);
        const first = await transport.send(events);
        expect(first.map((o) => meaning(o).kind)).toEqual(events.map(() => 'retry'));
        expect(first.every((o) => o.kind === 'retryable' && o.status === 500)).toBe(true);
        if (events.length > 1) expect(first.every((o) => o.scope === 'call')).toBe(true);
        const again = await transport.send(events);
        expect(again.map((o) => meaning(o).kind)).toEqual(
          events.map(() => (d.validating ? 'accepted' : 'delivered')),
        );
        for (const e of events) expect(billed(e.identifier)).toBe(1);
      });

      it('after "accepted, then the connection dropped": never failed, the resend settles it, billed once', async () => {
        const transport = d.transport();
        const events = callOf();
        d.script(['accepted_then_reset', 'accepted_then_reset']);
        const calls = d.calls();
        const first = await transport.send(events);
        // No answer reached the client (a network retry), unless the transport resent the call at once,
        // within its timeout, under the same idempotency key and got the recorded answer replayed
        // (Stripe's: src/billing/stripe-http.ts). At most one resend.
        for (const o of first) {
          if (o.kind === 'retryable') expect(o.reason).toBe('network');
          else expect(o.kind).toBe('accepted');
        }
        expect(d.calls() - calls).toBeLessThanOrEqual(2);
        d.script([]);
        const again = await transport.send(events);
        expect(again.map((o) => meaning(o).kind)).toEqual(
          events.map(() => (d.validating ? 'accepted' : 'delivered')),
        );
        for (const e of events) expect(billed(e.identifier)).toBe(1);
      });
    });

    describe('a call refused whole', () => {
      it('gives the call’s answer to every event of it, marked as the call’s when it carried several', async () => {
        const events = callOf();
        d.script(['error_500']);
        const outcomes = await d.transport().send(events);
        for (const o of outcomes) {
          expect(o).toMatchObject({ kind: 'retryable', status: 500, reason: 'server_error' });
          if (events.length > 1) expect(o.scope).toBe('call');
        }
        expect(outcomes).toHaveLength(events.length);
        expect(d.held()).toEqual([]);
      });

      it('is refused for its credentials: every event alike, not split into more calls (Stripe: held, the platform key refused; Metronome: permanent)', async () => {
        const events = callOf();
        const outcomes = await d.badCredentials().send(events);
        for (const o of outcomes) {
          // Stripe's 401 to the platform's own key holds delivery (PLATFORM_KEY_REFUSED: the key may be
          // fixed or restored, nothing is the event's fault); Metronome's bad token stays permanent.
          expect([
            { kind: 'retryable', status: 401, reason: 'platform_key_refused' },
            { kind: 'permanent', status: 401, reason: 'unauthorized' },
            { kind: 'permanent', status: 403, reason: 'forbidden' },
          ]).toContainEqual({
            kind: o.kind,
            status: o.kind !== 'accepted' && 'status' in o && o.status,
            reason: o.kind !== 'accepted' && 'reason' in o && o.reason,
          });
          expect(meaning(o).kind).toBe(o.kind === 'retryable' ? 'held' : 'failed');
        }
        expect(d.calls()).toBeLessThanOrEqual(1);
        expect(d.held()).toEqual([]);
      });
    });

    describe('an event refused for its content', () => {
      it('fails that event for good; the other events of its call are accepted, each billed once', async () => {
        const good = [conformanceEvent(), conformanceEvent()];
        const bad = badEvent();
        const outcomes = await sendAll(d.transport(), [good[0]!, bad, good[1]!]);
        expect(outcomes.map((o) => o.kind)).toEqual(['accepted', 'permanent', 'accepted']);
        // Found by resending parts of the refused call (halves, or one event a call): a few calls, not a storm.
        expect(d.calls()).toBeLessThanOrEqual(6);
        expect(outcomes[1]).toMatchObject({ status: 400, reason: 'invalid_request' });
        expect(meaning(outcomes[1]!).kind).toBe('failed');
        expect(
          d
            .held()
            .map((e) => e.identifier)
            .sort(),
        ).toEqual(good.map((e) => e.identifier).sort());
      });
    });

    describe('the destination busy or failing', () => {
      it('answers a 429 with Retry-After as retryable rate_limited for every event, carrying the wait', async () => {
        d.script(['rate_limit_429'], { retryAfterSeconds: 7 });
        const outcomes = await d.transport().send(callOf());
        for (const o of outcomes) {
          expect(o).toMatchObject({
            kind: 'retryable',
            status: 429,
            reason: 'rate_limited',
            retryAfterMs: 7_000,
          });
          expect(meaning(o).kind).toBe('rate_limited');
        }
        expect(d.held()).toEqual([]);
      });

      it('answers a 5xx as retryable server_error', async () => {
        d.script(['error_500']);
        const [outcome] = await d.transport().send([conformanceEvent()]);
        expect(outcome).toMatchObject({ kind: 'retryable', status: 500, reason: 'server_error' });
        expect(meaning(outcome!)).toMatchObject({ kind: 'retry', reason: 'server_error' });
      });

      it('answers a dropped connection as retryable network for every event, resent at most once', async () => {
        const transport = d.transport();
        const events = callOf();
        d.script(['reset', 'reset']);
        const calls = d.calls();
        const outcomes = await transport.send(events);
        for (const o of outcomes) {
          expect(o).toMatchObject({ kind: 'retryable', reason: 'network' });
          expect(meaning(o).kind).toBe('retry');
        }
        // At most one resend, within the call's timeout (src/billing/stripe-http.ts).
        expect(d.calls() - calls).toBeLessThanOrEqual(2);
        expect(d.held()).toEqual([]);
      });

      it('gives up on a call unanswered within its timeout: retryable timeout', async () => {
        const transport = d.transport();
        await transport.send([conformanceEvent()]); // a v2 session is made before the fault
        d.script(['timeout', 'timeout'], { hangMs: 5_000 });
        const started = Date.now();
        const [outcome] = await transport.send([conformanceEvent()], { timeoutMs: 300 });
        expect(outcome).toMatchObject({ kind: 'retryable', reason: 'timeout' });
        expect(Date.now() - started).toBeLessThan(3_000);
      });
    });

    describe('an event too old for the destination', () => {
      it('is expired: never delivered, never billed', async () => {
        const old = conformanceEvent({ timestamp: new Date(Date.now() - d.pastWindowMs - 86_400_000) });
        const [outcome] = await d.transport().send([old]);
        if (d.validating) {
          // Received on the wire, refused in the error report that follows.
          expect(outcome?.kind).toBe('accepted');
          expect(d.refusedLater()).toEqual([
            { identifier: old.identifier, code: 'timestamp_too_far_in_past' },
          ]);
        } else {
          expect(outcome?.kind).toBe('expired');
          expect(meaning(outcome!).kind).toBe('expired');
        }
        expect(d.held()).toEqual([]);
      });

      it('among good events of one call: only it expires, the others are delivered', async () => {
        const good = conformanceEvent();
        const old = conformanceEvent({ timestamp: new Date(Date.now() - d.pastWindowMs - 86_400_000) });
        const outcomes = await sendAll(d.transport(), [good, old]);
        const expected = d.validating ? ['accepted', 'accepted'] : ['delivered', 'expired'];
        expect(outcomes.map((o) => meaning(o).kind)).toEqual(expected);
        expect(d.held().map((e) => e.identifier)).toEqual([good.identifier]);
      });
    });
  });
}
