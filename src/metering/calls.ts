// Step 2 of a batch (batch.ts): its Stripe calls, concurrently, each after its slot of the shared
// budget and bounded by its key's lease.

import type { Kysely } from 'kysely';
import type { DB } from '../db/schema.js';
import type { CallSlots } from './budget.js';
import { type CorrectionClient, type CorrectionGroup, sendCorrection } from './corrections.js';
import type { ClaimedGroup, ClaimedKey } from './delivery-sql.js';
import type { DeliveryObserver } from './observer.js';
import type { SendOutcome } from './stripe-meter.js';
import type { MeterTransport } from './transport.js';

/** A call must be able to end this long before its key's lease expires. */
const LEASE_MARGIN_MS = 1_000;
/** The Stripe client's own timeout (src/context.ts): no call needs longer. */
const CALL_TIMEOUT_MS = 15_000;
/** A call given less than this before the lease deadline is not started (the key runs again later). */
const MIN_CALL_MS = 1_000;

/** A leased key's event to send: usage (transport) or a correction (its own v1 call). */
export interface Planned {
  key: Extract<ClaimedKey, { state: 'leased' }>;
  group: ClaimedGroup;
  correction?: CorrectionGroup;
}

/** The result of one planned event: the answer, or none (not called: no budget slot or lease time). */
export type Answer = { planned: Planned; outcome: SendOutcome | null; waitMs?: number };

/** What the calls use of a batch's dependencies (batch.ts's BatchDeps has them all). */
export interface CallDeps {
  db: Kysely<DB>;
  transport: MeterTransport;
  slots: CallSlots;
  corrections?: CorrectionClient;
  observer?: DeliveryObserver;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Step 2: the batch's Stripe calls, concurrently, each after its slot of the shared budget. A call is
 * started only if it can end (its timeout) before the key's lease expires, so a lease never lapses
 * while its call is open; an event that gets no slot in time is not called and its key runs again.
 */
export async function callStripe(
  deps: CallDeps,
  planned: readonly Planned[],
  leaseDeadline: number,
): Promise<Answer[]> {
  const observer = deps.observer ?? {};
  const usage = planned.filter((p) => !p.correction);
  const perCall = Math.max(1, deps.transport.maxEventsPerCall);
  const calls: Planned[][] = [];
  for (let i = 0; i < usage.length; i += perCall) calls.push(usage.slice(i, i + perCall));
  for (const p of planned) if (p.correction) calls.push([p]);

  const answered = await Promise.all(
    calls.map(async (call): Promise<Answer[]> => {
      const slot = await deps.slots.take();
      if (!slot.granted) return call.map((planned) => ({ planned, outcome: null, waitMs: slot.waitMs }));
      if (slot.waitMs > 0) await sleep(slot.waitMs);
      const timeoutMs = Math.min(CALL_TIMEOUT_MS, leaseDeadline - LEASE_MARGIN_MS - Date.now());
      if (timeoutMs < MIN_CALL_MS) return call.map((planned) => ({ planned, outcome: null, waitMs: 0 }));
      const started = performance.now();
      observer.onInFlight?.(1);
      let outcomes: SendOutcome[];
      try {
        const first = call[0]!;
        outcomes = first.correction
          ? [
              await sendCorrection(
                deps.db,
                deps.corrections!,
                first.key.customerId,
                first.key.eventName,
                first.correction,
              ),
            ]
          : await deps.transport.send(
              call.map((p) => ({
                eventName: p.key.eventName,
                customerId: p.key.customerId,
                value: p.group.value,
                timestamp: p.group.timestamp,
                identifier: p.group.identifier,
              })),
              { timeoutMs },
            );
      } catch (err) {
        const message = err instanceof Error ? err.message : String(err);
        outcomes = call.map(() => ({ kind: 'retryable', reason: 'network', message }));
      } finally {
        observer.onInFlight?.(-1);
      }
      const ms = performance.now() - started;
      return call.map((planned, i) => {
        const outcome: SendOutcome = outcomes[i] ?? {
          kind: 'retryable',
          reason: 'network',
          message: 'transport returned no outcome',
        };
        observer.onCall?.(outcome.kind, ms, planned.key.eventName);
        return { planned, outcome };
      });
    }),
  );
  return answered.flat();
}
