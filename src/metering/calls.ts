// Step 2 of a batch (batch.ts): its Stripe calls, concurrently, each after its slot of the shared
// budget and bounded by what its key's lease has left.
import type { HostTimers } from '../clock.js';
import { SpanStatusCode, startDeliverySpan } from '../observability/tracing.js';
import type { CallSlots, Reservation } from './budget.js';
import { type CorrectionClient, sendCorrection } from './corrections.js';
import type { DeliveryObserver } from './observer.js';
import type { Answer, KeyRef } from './rules/keys.js';
import type { PlannedCall } from './rules/plan.js';
import type { SendOutcome } from './stripe-meter.js';
import type { MeterTransport } from './transport.js';

/** A call must be able to end this long before its key's lease expires. */
const LEASE_MARGIN_MS = 1_000;
/** The Stripe client's own timeout (src/context.ts): no call needs longer. */
const CALL_TIMEOUT_MS = 15_000;
/** A call given less than this before the lease deadline is not started (the key runs again later). */
const MIN_CALL_MS = 1_000;

/** What the calls use of a batch's dependencies (batch.ts's BatchDeps has them all). */
export interface CallDeps {
  transport: MeterTransport;
  slots: CallSlots;
  corrections?: CorrectionClient;
  /** Commits a correction group's switch from cancel to compensate (before the negative event). */
  switchToCompensate: (key: KeyRef, identifier: string) => Promise<void>;
  observer?: DeliveryObserver;
  timers: HostTimers;
  /**
   * While tracing records: the traceparents of the requests whose rows each usage group carries (by
   * identifier); each usage call then gets a span in the first request's trace, linked to the others.
   */
  traces?: ReadonlyMap<string, readonly string[]>;
  /** The destination, as the calls' span attribute. */
  destination?: string;
  /**
   * The destination's Retry-After in this process (the host's monotonic ms before which nothing is
   * sent to it), shared by its batches: a call about to start after another call's Retry-After waits
   * on the destination instead. Moved on by any answer that carries one.
   */
  hold?: { until: number };
}

/**
 * Step 2: the batch's Stripe calls, concurrently, each after its slot of the shared budget. A call is
 * started only if it can end (its timeout) before its key's lease expires — `leaseDeadline()` is read
 * at each call's start, since a running batch renews its leases — so a lease never lapses while its
 * call is open; an event that gets no slot in time is not called and its key runs again.
 */
export async function callStripe(
  deps: CallDeps,
  planned: readonly PlannedCall[],
  leaseDeadline: () => number,
): Promise<Answer[]> {
  const observer = deps.observer ?? {};
  const timers = deps.timers;
  const usage = planned.filter((p) => !p.correction);
  const perCall = Math.max(1, deps.transport.maxEventsPerCall);
  const calls: PlannedCall[][] = [];
  for (let i = 0; i < usage.length; i += perCall) calls.push(usage.slice(i, i + perCall));
  for (const p of planned) if (p.correction) calls.push([p]);
  const answer = (
    p: PlannedCall,
    outcome: SendOutcome | null,
    waitMs?: number,
    call?: number,
    late?: boolean,
  ): Answer => ({
    key: p.key,
    group: p.group,
    correction: p.correction !== undefined,
    outcome,
    ...(waitMs === undefined ? {} : { waitMs }),
    ...(call === undefined ? {} : { call }),
    ...(late ? { late } : {}),
  });
  const hold = deps.hold;
  /** Milliseconds the destination's Retry-After still holds calls (0: none). */
  const heldFor = () => (hold ? Math.max(0, Math.ceil(hold.until - timers.now())) : 0);
  const waitOnDestination = (call: PlannedCall[], waitMs: number) =>
    call.map((p) => ({ ...answer(p, null, waitMs), destinationWait: true }));
  /** The timeout a call starting now may have, or null when too little of the lease is left. */
  const timeoutNow = () => {
    // Whole milliseconds: the monotonic clock has fractions, and Metronome's client refuses them.
    const ms = Math.floor(Math.min(CALL_TIMEOUT_MS, leaseDeadline() - LEASE_MARGIN_MS - timers.now()));
    return ms < MIN_CALL_MS ? null : ms;
  };

  const answered = await Promise.all(
    calls.map(async (call, index): Promise<Answer[]> => {
      // A call of many events takes the slots its events need (the v2 stream, Metronome: limits.ts).
      if (heldFor() > 0) return waitOnDestination(call, heldFor());
      // At the slot or not at all (budget.ts LATE_SLOT_MS): a late wake-up takes the next slot.
      const slot = await awaitSlot(deps.slots, timers, call.length, () => observer.onLateSlot?.());
      if (!slot.granted) return call.map((p) => answer(p, null, slot.waitMs));
      if (timeoutNow() === null) return call.map((p) => answer(p, null, 0));
      // A Retry-After that came in while this call waited for its slot: not sent.
      if (heldFor() > 0) return waitOnDestination(call, heldFor());
      const started = timers.now();
      // The lease deadline this call starts under: its timeout ends LEASE_MARGIN_MS before it, so an
      // answer after it means this process was frozen or stalled meanwhile (Answer.late).
      const deadlineAtStart = leaseDeadline();
      const awake = timers.awake;
      const awakeAtStart = awake?.();
      observer.onInFlight?.(1);
      let outcomes: (SendOutcome | null)[];
      try {
        const first = call[0]!;
        if (first.correction) {
          if (!deps.corrections) return call.map((p) => answer(p, null, 0));
          outcomes = [
            await sendCorrection(
              deps.corrections,
              (identifier) => deps.switchToCompensate(first.key, identifier),
              first.key.customerId,
              first.key.eventName,
              first.correction,
              timeoutNow,
            ),
          ];
        } else {
          // Read again at the call itself: a process frozen (SIGSTOP, a long GC pause) since the check
          // above may wake after its lease; the monotonic clock has moved on, and nothing is sent.
          const timeoutMs = timeoutNow();
          if (timeoutMs === null) return call.map((p) => answer(p, null, 0));
          const traces = deps.traces;
          const span = traces
            ? startDeliverySpan(
                'meterbox.delivery.call',
                call.flatMap((p) => traces.get(p.group.identifier) ?? []),
                {
                  'meterbox.destination': deps.destination ?? 'stripe',
                  'meterbox.meter': first.key.eventName,
                  'meterbox.events': call.length,
                  'meterbox.value': call.reduce((n, p) => n + Number(p.group.value), 0),
                },
              )
            : undefined;
          try {
            outcomes = await deps.transport.send(
              call.map((p) => ({
                eventName: p.key.eventName,
                customerId: p.key.customerId,
                value: p.group.value,
                timestamp: p.group.timestamp,
                identifier: p.group.identifier,
              })),
              { timeoutMs },
            );
            if (
              span &&
              outcomes.some((o) => o === null || (o.kind !== 'accepted' && o.kind !== 'duplicate'))
            ) {
              span.setStatus({ code: SpanStatusCode.ERROR, message: 'not every event was recorded' });
            }
          } catch (err) {
            span?.setStatus({ code: SpanStatusCode.ERROR, message: 'the call failed' });
            throw err;
          } finally {
            span?.end();
          }
        }
      } catch (err) {
        const message = err instanceof Error ? err.message : String(err);
        outcomes = call.map(() => ({ kind: 'retryable', reason: 'network', message }));
      } finally {
        observer.onInFlight?.(-1);
      }
      const ms = timers.now() - started;
      // Also late: an answer this process stood still while it waited for (clock.ts, watchStalls), even
      // inside its lease: a lease grown by slow claims (lease-length.ts) can outlast a freeze, and the
      // woken process may run the call's timeout before the reply that came meanwhile. Counted, that
      // timeout would fail at a low retry limit a group the destination billed. The two clocks are read
      // at slightly different instants, so a stall counts from a millisecond.
      const stood = awake && awakeAtStart !== undefined ? ms - (awake() - awakeAtStart) : 0;
      const late = timers.now() > deadlineAtStart || stood >= 1;
      if (hold) {
        for (const o of outcomes) {
          if (o?.kind === 'retryable' && o.retryAfterMs !== undefined)
            hold.until = Math.max(hold.until, timers.now() + o.retryAfterMs);
        }
      }
      return call.map((p, i) => {
        const outcome = outcomes[i];
        if (outcome === null) return answer(p, null, 0);
        const o: SendOutcome = outcome ?? {
          kind: 'retryable',
          reason: 'network',
          message: 'transport returned no outcome',
        };
        observer.onCall?.(o.kind, ms, p.key.eventName);
        return answer(p, o, undefined, index, late);
      });
    }),
  );
  return answered.flat();
}

/**
 * Waits for a call's turn: the dispenser's `acquire` (late slots dropped, never calls); a fake without
 * it (tests, the simulation's virtual time), `take` and a sleep. Not granted: nothing is held and the
 * key runs again after `waitMs`.
 */
export async function awaitSlot(
  slots: CallSlots,
  timers: { sleep(ms: number): Promise<void> },
  events = 1,
  onLate?: () => void,
): Promise<Pick<Reservation, 'granted' | 'waitMs'>> {
  if (slots.acquire) return slots.acquire(events, onLate);
  const slot = await slots.take(events);
  if (slot.granted && slot.waitMs > 0) await timers.sleep(slot.waitMs);
  return slot;
}
