// Calls to the destinations, as the transports and the corrections clients make them (modelled): a
// round trip to the Stripe or Metronome model with its latency, the client's timeout, a process that
// freezes between its lease check and its send; and what every call is checked against as it goes
// out or comes back: one call in flight per customer and meter, a lease held by the database's clock,
// an identifier never resent past the destination's dedupe window, a group within its retry limit,
// and no reading billed under two live identifiers.
import type { Destination } from '../../src/db/schema.js';
import type { CorrectionClient } from '../../src/metering/corrections.js';
import { keyName, leaseGrantedTo } from '../../src/metering/rules/keys.js';
import { ACCOUNT_ACCESS_REFUSED, type SendOutcome } from '../../src/metering/stripe-meter.js';
import type { MeterTransport } from '../../src/metering/transport.js';
import { METRONOME_DEDUPE_MS } from './metronome-model.js';
import { type CallEvent, STRIPE_DEDUPE_MS, STRIPE_FUTURE_MS } from './stripe-model.js';
import { freeze, type Worker, type World } from './world.js';

export interface Destinations {
  /** Stripe's meter events (v1 or v2, as the world's transport) for worker `w`. */
  transportOf(w: Worker): MeterTransport;
  correctionsOf(w: Worker): CorrectionClient;
  metronomeTransportOf(w: Worker): MeterTransport;
  metronomeCorrectionsOf(w: Worker): CorrectionClient;
  /** Whether `identifier` is billed at `destination` now (sent, kept, not cancelled). */
  liveAt(destination: Destination, identifier: string): boolean;
}

export function destinationsOf(world: World): Destinations {
  const {
    sched,
    db,
    rng,
    hostileRng,
    profile,
    mutations,
    spec,
    stripe,
    metronome,
    log,
    violate,
    now,
    dbNow,
  } = world;
  const inFlight = new Map<string, number>();
  const firstSent = new Map<string, number>();
  /** Identifier → the idempotency keys of its cancels in flight. */
  const cancelsInFlight = new Map<string, string[]>();

  const call = async (
    w: Worker,
    events: readonly CallEvent[],
    timeoutMs: number,
    v2: boolean,
    kind = 'meter_event',
    cancel?: string,
    destination: Destination = 'stripe',
  ): Promise<SendOutcome[]> => {
    // The process may freeze between the lease check that allowed the call and the send: nothing
    // can prevent that, so such a late call is watched apart (its identifiers keep it harmless).
    const late = await freezeBeforeSend(w);
    if (!w.alive) return new Promise<SendOutcome[]>(() => {});
    const start = now();
    // A cancel is an adjustment, not a meter event: Stripe's one-call-per-customer rule is about events.
    const prefix = destination === 'stripe' ? '' : `${destination}:`;
    // A late call (sent after a freeze between its lease check and its send) is watched apart, cancels
    // included: no lease can stop a process frozen past that check, and Stripe has no fencing token.
    // What keeps a late cancel harmless is that it repeats the cancel of its group under the same
    // idempotency key (derived from the group, corrections.ts): Stripe answers a replay with the first
    // answer, or 409 while the first is in flight (retryable; the stale worker's settle is refused), and
    // a cancelled event cancelled again changes nothing. So every cancel of one identifier in flight at
    // once must carry one idempotency key, late or not; two non-late ones at once are a violation.
    const keys = late
      ? []
      : cancel
        ? [`cancel:${cancel}`]
        : events.map((e) => `${prefix}${e.eventName}:${e.customerId}`);
    const cancelKey = cancel ? { identifier: cancel, idempotencyKey: events[0]?.identifier ?? '' } : null;
    if (cancelKey) {
      const open = cancelsInFlight.get(cancelKey.identifier) ?? [];
      const other = open.find((k) => k !== cancelKey.idempotencyKey);
      if (other !== undefined)
        violate(
          `cancels of ${cancelKey.identifier} in flight under two idempotency keys (${other}, ${cancelKey.idempotencyKey})`,
        );
      cancelsInFlight.set(cancelKey.identifier, [...open, cancelKey.idempotencyKey]);
    }
    const dedupeMs = destination === 'stripe' ? STRIPE_DEDUPE_MS : METRONOME_DEDUPE_MS;
    for (const k of keys) {
      const n = (inFlight.get(k) ?? 0) + 1;
      inFlight.set(k, n);
      if (n > 1) violate(`two calls in flight for ${k}`);
    }
    for (const e of events) {
      const k = `${prefix}${e.eventName}:${e.customerId}`;
      world.callsPerKey.set(k, (world.callsPerKey.get(k) ?? 0) + 1);
    }
    if (!cancel && !late) checkLeaseAtSend(w, events);
    for (const e of events) {
      const first = firstSent.get(e.identifier) ?? start;
      firstSent.set(e.identifier, first);
      if (start - first >= dedupeMs) {
        violate(
          `identifier ${e.identifier} resent ${((start - first) / 3_600_000).toFixed(1)} h after its first call`,
        );
      }
    }
    world.counts.totalCalls++;
    const latency = 20 + rng.int(400);
    const answerIn = new Promise<{ outcomes: SendOutcome[]; at: number }>((resolve) => {
      sched.after(Math.min(latency, timeoutMs), () => {
        if (latency > timeoutMs) return;
        const arrival = cancel
          ? { outcomes: [stripe.cancel(cancel)], answerDelayMs: 50 }
          : destination === 'metronome'
            ? { outcomes: metronome.arrive(events), answerDelayMs: 50 + rng.int(200) }
            : stripe.arrive(events, v2, 50 + rng.int(200));
        for (const [i, e] of events.entries()) {
          const o = arrival.outcomes[i];
          if (!cancel && o?.kind === 'retryable' && o.reason === 'timestamp_in_future') {
            checkNotHeldBehindFuture(e);
            // Mutation: the answer read as any retryable error, counted toward the retry limit.
            if (mutations.has('futureFails'))
              arrival.outcomes[i] = {
                kind: 'retryable',
                reason: 'server_error',
                message: o.message,
                status: 500,
              };
          }
          if (o?.kind === 'retryable' && o.reason === ACCOUNT_ACCESS_REFUSED) {
            // Mutation: the account's refusal read as the destination's failure, counted toward the limit.
            if (mutations.has('accessRefusalCounted'))
              arrival.outcomes[i] = {
                kind: 'retryable',
                reason: 'server_error',
                message: o.message,
                status: 500,
              };
          }
          const a = arrival.outcomes[i];
          // A 429, a timestamp not yet due and a connected account's refusal of access
          // (rules/decide-batch.ts) do not count toward the retry limit.
          const uncounted =
            a?.kind === 'retryable' &&
            (a.reason === 'rate_limited' ||
              a.reason === 'timestamp_in_future' ||
              a.reason === ACCOUNT_ACCESS_REFUSED);
          if (cancel || !a || uncounted) continue;
          const n = (world.calls.get(e.identifier) ?? 0) + 1;
          world.calls.set(e.identifier, n);
          // At most DELIVERY_RETRY_LIMIT + 1 counted calls a group; a batch killed or failed after
          // its call, or whose lease ran out under it (its settle is refused), never recorded it,
          // so each such batch may add one.
          const c = world.counts;
          if (
            !e.identifier.includes('trc_') &&
            n > spec.retryLimit + 1 + c.crashes + c.batchFailures + c.takeovers + c.lateCalls + c.lateAnswers
          ) {
            violate(`identifier ${e.identifier} called ${n} times (limit ${spec.retryLimit})`);
          }
        }
        log(
          `${w.id} ${late ? 'late ' : ''}${kind} ${events.map((e) => `${e.customerId}=${e.value}#${e.identifier.slice(-6)}`).join(',')} -> ${arrival.outcomes.map((o) => o.kind + ('reason' in o ? `:${o.reason}` : '')).join(',')}`,
        );
        checkBilledOnce();
        resolve({ outcomes: arrival.outcomes, at: now() + arrival.answerDelayMs });
      });
    });
    // The client's answer: Stripe's, or a timeout when it comes later than timeoutMs.
    return new Promise<SendOutcome[]>((resolve) => {
      let done = false;
      let cancelTimeout = () => {};
      const finish = (outcomes: SendOutcome[]) => {
        if (done) return;
        done = true;
        cancelTimeout();
        for (const k of keys) inFlight.set(k, (inFlight.get(k) ?? 1) - 1);
        if (cancelKey) {
          const open = [...(cancelsInFlight.get(cancelKey.identifier) ?? [])];
          open.splice(open.indexOf(cancelKey.idempotencyKey), 1);
          cancelsInFlight.set(cancelKey.identifier, open);
        }
        // A timeout or a refused connection its worker hears only after a freeze: the product may leave
        // it uncounted (rules/decide-batch.ts, Answer.late: the process ran out, not the destination), so the group
        // may be called once more than its limit for each such answer, as for a late call.
        if (
          w.frozenUntil > now() &&
          outcomes.some((o) => o.kind === 'retryable' && (o.reason === 'timeout' || o.reason === 'network'))
        )
          world.counts.lateAnswers++;
        w.gate(() => {
          if (w.alive) resolve(outcomes);
        });
      };
      cancelTimeout = sched.after(timeoutMs, () =>
        finish(events.map(() => ({ kind: 'retryable', reason: 'timeout', message: 'Request timed out' }))),
      );
      void answerIn.then(({ outcomes, at }) => {
        sched.after(Math.max(0, at - now()), () => {
          if (at - start <= timeoutMs) finish(outcomes);
        });
      });
    });
  };

  /**
   * A group the destination refused as stamped in the future must carry no reading that was already
   * due: a valid reading never waits behind (or fails with) one stamped ahead of the tolerance.
   */
  const checkNotHeldBehindFuture = (e: CallEvent) => {
    const members = db.rows.filter((r) => r.identifier === e.identifier);
    const due = members.filter((r) => r.occurredAt <= now() + STRIPE_FUTURE_MS);
    if (due.length > 0 && due.length < members.length)
      violate(
        `group ${e.identifier} holds ${due.length} due readings behind ${members.length - due.length} stamped up to ${Math.round((e.timestamp.getTime() - now()) / 60_000)} min ahead`,
      );
  };

  /** Maybe freezes `w` right before a send (hostile, before the world quiets); true if it did. */
  const freezeBeforeSend = async (w: Worker): Promise<boolean> => {
    if (world.quiet || profile.freezeBeforeCall === 0 || hostileRng.next() >= profile.freezeBeforeCall)
      return false;
    freeze(world, w, 1_000 + hostileRng.int(profile.freezeMaxMs), 'between its lease check and its call');
    await new Promise<void>((resolve) => w.gate(resolve));
    world.counts.lateCalls++;
    return true;
  };
  /**
   * A call goes out only under a lease its worker holds by the database's clock, on rows the
   * database has (a failover must not have lost the claim that grouped them).
   */
  const checkLeaseAtSend = (w: Worker, events: readonly CallEvent[]) => {
    for (const e of events) {
      const head = db.rows.find((r) => r.identifier === e.identifier);
      if (!head) {
        violate(`${w.id} called ${e.identifier}, which the database does not have (its claim was lost)`);
        continue;
      }
      const k = db.keys.get(keyName(head));
      // The lease granted to the worker's batch, revoked since by a redrive or not: the key stays
      // leased until its end, and no other batch calls for it meanwhile (takeKeysFromBatches).
      const owned = k?.leaseOwner ? leaseGrantedTo(k.leaseOwner).startsWith(`${w.id}:`) : false;
      if (!owned || !k?.leaseExpiresAt || k.leaseExpiresAt.getTime() < dbNow())
        violate(
          `${w.id} called ${e.identifier} under a lease it does not hold (owner ${k?.leaseOwner ?? 'none'}, expires ${k?.leaseExpiresAt?.toISOString() ?? '-'}, database ${new Date(dbNow()).toISOString()})`,
        );
    }
  };
  /** Row nonce → the identifier that billed it: a reading is never billed under two live identifiers. */
  const billedUnder = new Map<string, string>();
  let stripeSeen = 0;
  let metronomeSeen = 0;
  const liveAt = (destination: Destination, identifier: string) =>
    destination === 'stripe'
      ? (stripe.byIdentifier.get(identifier) ?? []).some((r) => !r.dropped && !r.cancelled)
      : metronome.events.some((r) => r.transactionId === identifier);
  const checkBilledOnce = () => {
    const fresh: { destination: Destination; identifier: string }[] = [];
    for (; stripeSeen < stripe.events.length; stripeSeen++) {
      const e = stripe.events[stripeSeen]!;
      if (!e.dropped) fresh.push({ destination: 'stripe', identifier: e.identifier });
    }
    for (; metronomeSeen < metronome.events.length; metronomeSeen++)
      fresh.push({ destination: 'metronome', identifier: metronome.events[metronomeSeen]!.transactionId });
    for (const { destination, identifier } of fresh) {
      for (const r of db.rows) {
        if (r.identifier !== identifier || r.kind !== 'usage' || r.destination !== destination) continue;
        const before = billedUnder.get(r.nonce);
        // An hourly report's count of 0 sent again by a reconciled redrive (which cannot tell it from a
        // window without it, rules/reconcile.ts) bills nothing twice: a `last` meter's value at its time
        // is 0 with one such event or two. Every other row billed under a second live identifier is.
        const zeroReport = r.eventName === 'active_sensors' && r.value === 0n;
        if (before !== undefined && before !== identifier && liveAt(destination, before) && !zeroReport)
          violate(
            `row ${r.id} (${r.customerId}) billed twice at ${destination}: under ${before} and ${identifier}`,
          );
        billedUnder.set(r.nonce, identifier);
      }
    }
  };

  const transportOf = (w: Worker): MeterTransport => ({
    kind: spec.transport,
    maxEventsPerCall: spec.transport === 'v2' ? 100 : 1,
    send: (events, options) => call(w, events, options?.timeoutMs ?? 15_000, spec.transport === 'v2'),
  });
  const correctionsOf = (w: Worker): CorrectionClient => ({
    cancel: async (eventName, identifier, idempotencyKey, options) => {
      const [o] = await call(
        w,
        [
          {
            eventName,
            customerId: `adjustment`,
            value: '0',
            timestamp: new Date(now()),
            identifier: idempotencyKey,
          },
        ],
        options?.timeoutMs ?? 15_000,
        false,
        'cancel',
        identifier,
      );
      return o!;
    },
    send: async (event, options) =>
      (await call(w, [event], options?.timeoutMs ?? 15_000, false, 'compensate'))[0]!,
  });

  const metronomeTransportOf = (w: Worker): MeterTransport => ({
    kind: 'metronome',
    maxEventsPerCall: 100,
    send: (events, options) =>
      call(w, events, options?.timeoutMs ?? 15_000, false, 'ingest', undefined, 'metronome'),
  });
  const metronomeCorrectionsOf = (w: Worker): CorrectionClient => ({
    // Metronome voids nothing: its correction groups always compensate (corrections.ts).
    cancel: async () => ({ kind: 'permanent', reason: 'cannot_cancel', message: 'Metronome voids no event' }),
    send: async (event, options) =>
      (await call(w, [event], options?.timeoutMs ?? 15_000, false, 'compensate', undefined, 'metronome'))[0]!,
  });

  return { transportOf, correctionsOf, metronomeTransportOf, metronomeCorrectionsOf, liveAt };
}
