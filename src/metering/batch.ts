// What a batch of delivery goes through: the one place that says it. A worker fetches a batch of
// meter-delivery jobs (one per customer+meter key) from pg-boss and moves them together:
//
//   1. claim    one statement: lease the keys, commit each key's next group (identifier, value, time)
//               and say what is left; keys with correction rows get a second look (corrections-sql.ts)
//   2. call     one budget slot per Stripe call; v1 one call per key's event, v2 up to 100 keys' events
//               a call; every call ends (timeout) before the key's lease can expire; the leases are
//               renewed while the calls run
//   3. decide   rules/decide-batch.ts: what every answer means, backoff and dead letter from the group's
//               own attempts, follow-ups, holds, job results — a pure function
//   4. settle   one statement: every answer, the keys' pacing and backoff, lease release
//   5. follow   one statement: jobs for keys that must run again; a hold for keys whose meter is missing
//   6. results  one per job; the fetcher ends each job with its own (job-completion.ts), by id
//
// This file is the shell: it runs the store's statements (store.ts) and the calls (calls.ts) around
// the rules, under the keys' lease (batch-lease.ts), and reports what happened once the rules have
// decided (batch-report.ts); it decides nothing itself. A batch goes through these steps in shares, each
// destination's jobs (Stripe, Metronome) and each Stripe Connect account's on their own, with that
// share's transport, call budget, catalog and policy, side by side. The simulation (scripts/sim) runs
// this same function against models of Postgres, pg-boss and Stripe.
// A batch that fails after its claim gives its keys back at once (releaseLeases), unless Stripe calls
// may still be open: then the leases run out, so a key never has two calls in flight.
import { randomBytes } from 'node:crypto';
import { hostTimers } from '../clock.js';
import type { Destination } from '../db/schema.js';
import { startSpan } from '../observability/tracing.js';
import type { BatchDeps, ConnectedDeps, DeliveryJob, DeliveryStore, DestinationDeps } from './batch-deps.js';
import { claimLease } from './batch-lease.js';
import { type BatchReport, reportBatch } from './batch-report.js';
import type { CallSlots } from './budget.js';
import { callStripe } from './calls.js';
import { afterCalls, readAnswers } from './rules/answers.js';
import { decideBatch } from './rules/decide-batch.js';
import { type Gate, healthPolicy, splitByGate } from './rules/health.js';
import { type JobOutcome, jobKeys } from './rules/jobs.js';
import { type CorrectionFacts, keyName } from './rules/keys.js';
import { needsCorrectionClaim, planCalls } from './rules/plan.js';
import { deliveryPolicy } from './rules/policy.js';
import type { MeterTransport } from './transport.js';

/** The slots of a batch whose claim a standby may lack: none granted, the keys run again in a second. */
const NOT_REPLICATED: CallSlots = { take: async () => ({ granted: false, waitMs: 1_000 }) };

/** A transport for a destination that is not configured: never called (its keys are all held). */
const UNCONFIGURED: MeterTransport = {
  kind: 'metronome',
  maxEventsPerCall: 1,
  send: () => Promise.reject(new Error('destination not configured')),
};

/** This process's lease owner id; each batch adds its own suffix, so two batches exclude each other too. */
export const WORKER_INSTANCE_ID = `${process.pid}-${randomBytes(6).toString('hex')}`;

let batchCounter = 0;

/**
 * Moves one batch of meter-delivery jobs through claim, call, decide, settle and follow-up; returns
 * each job's result. The batch goes through in shares, each on its own (one claim and one settle each):
 * each destination's jobs, and with Stripe Connect each connected account's Stripe jobs (its calls carry
 * the account, take its budget row's slots, and no call mixes two accounts).
 */
export async function deliverBatch(deps: BatchDeps, jobs: readonly DeliveryJob[]): Promise<JobOutcome[]> {
  const byDestination = groupBy(jobs, (job) => job.data.destination ?? 'stripe');
  const stripe = byDestination.get('stripe') ?? [];
  const { accountsOf, connected } = deps;
  const accounts =
    accountsOf && connected && stripe.length > 0
      ? await accountsOf(stripe.map((job) => job.data.customerId))
      : new Map<string, string>();
  const shares = [...byDestination].flatMap(([destination, own]) =>
    destination === 'stripe' && accounts.size > 0
      ? [...groupBy(own, (job) => accounts.get(job.data.customerId) ?? '')].map(([account, mine]) => ({
          destination,
          account,
          jobs: mine,
        }))
      : [{ destination, account: '', jobs: own }],
  );
  const results = await Promise.all(
    shares.map(async (share) => {
      const dest =
        share.account !== '' && connected ? await connected(share.account) : ownDeps(deps, share.destination);
      return deliverShare(deps, share.destination, dest, share.jobs);
    }),
  );
  return results.flat();
}

/** A destination's own deps (Stripe: the platform's; undefined: not configured in this process). */
function ownDeps(deps: BatchDeps, destination: Destination): DestinationDeps | undefined {
  if (destination !== 'stripe') return deps.metronome;
  return {
    transport: deps.transport,
    slots: deps.slots,
    ...(deps.hold ? { hold: deps.hold } : {}),
    ...(deps.corrections ? { corrections: deps.corrections } : {}),
    ...(deps.catalog ? { catalog: deps.catalog } : {}),
  };
}

function groupBy<T, K>(items: readonly T[], keyOf: (item: T) => K): Map<K, T[]> {
  const groups = new Map<K, T[]>();
  for (const item of items) {
    const key = keyOf(item);
    const list = groups.get(key);
    if (list) list.push(item);
    else groups.set(key, [item]);
  }
  return groups;
}

/** One share of a batch: a destination's jobs, or a connected account's (dest undefined: the destination is
 * not configured here). */
async function deliverShare(
  deps: BatchDeps,
  destination: Destination,
  dest: DestinationDeps | undefined,
  jobs: readonly DeliveryJob[],
): Promise<JobOutcome[]> {
  const config = deps.config;
  const timers = deps.timers ?? hostTimers;
  const transport = dest?.transport ?? UNCONFIGURED;
  const connected = dest && 'account' in dest ? (dest as ConnectedDeps) : undefined;
  // A connected account: its 429s slow its own budget row, and its outage is its own (its own health
  // row: the platform's customers keep being delivered while its groups wait on it).
  const base = deps.store(destination, connected?.account);
  const store: DeliveryStore = connected ? { ...base, rateLimited: connected.rateLimited } : base;
  const owner = `${deps.owner ?? WORKER_INSTANCE_ID}:${++batchCounter}`;
  const policy = deliveryPolicy(config, transport.kind);
  // Jobs queued before jobs named their organization: their keys' organizations are looked up once.
  const unnamed = jobs.filter((job) => !job.data.organizationId);
  const organizations =
    unnamed.length > 0
      ? await store.organizationsOf(
          unnamed.map((job) => ({
            customerId: job.data.customerId,
            eventName: job.data.eventName,
            destination,
          })),
        )
      : new Map<string, string>();
  const { refs: jobRefs, done } = jobKeys(jobs, destination, organizations);
  if (jobRefs.length === 0) return done;
  const keys = [...new Map(jobRefs.map((j) => [keyName(j.key), j.key])).values()];

  // 1. claim: the keys' leases, renewed while the batch runs (batch-lease.ts).
  const lease = await claimLease({ ...deps, timers }, store, keys, {
    owner,
    // An unconfigured destination sends nothing: every key is held by name.
    sendable: (['temperature_readings', 'active_sensors'] as const).filter((m) =>
      dest ? (dest.catalog?.sendable(m) ?? true) : false,
    ),
  });
  const { claimed, leased, stopRenewing } = lease;

  // Whatever fails from here on gives the keys back (releaseLeases) unless Stripe calls may still be
  // open: then the leases run out as usual, so no key has two calls in flight.
  let callsOpen = false;
  try {
    // 1b. corrections: a second look for the keys whose claim saw correction rows.
    const corrections = new Map<string, CorrectionFacts>();
    if (dest?.corrections) {
      for (const key of leased.filter(needsCorrectionClaim)) {
        corrections.set(
          keyName(key),
          await store.claimCorrections(key, {
            now: deps.clock.now(),
            validationSeconds: policy.validationMs / 1000,
          }),
        );
      }
    }
    const plan = planCalls(leased, corrections, deps.clock.now(), policy);

    // 2a. the destination's gate (destination-health.ts): while it is down, or asked to wait
    // (Retry-After), its keys wait on it instead of calling and backing off one by one; one batch at a
    // time holds the probe slot and sends one call.
    const health = store.health;
    const healthRules = healthPolicy(config);
    const gate: Gate = health && plan.calls.length > 0 ? await health.gate() : { kind: 'open', failures: 0 };
    if (gate.kind === 'wait' && gate.reason === 'retry_after' && dest?.hold) {
      dest.hold.until = Math.max(dest.hold.until, timers.now() + gate.waitMs);
    }
    const { call: toCall, waiting } = splitByGate(plan.calls, gate, healthRules);

    // 2. call, once every standby that could be promoted has the claim: a promotion that lost an
    // identifier already sent would regroup its rows and bill them twice (docs/architecture.md, Failover).
    const replicated = toCall.length === 0 || !deps.replication || (await deps.replication.confirm());
    // Tracing (docs/operations.md): the batch's span records only with an SDK registered; then each
    // usage call gets a span in the trace of the requests whose rows it carries. Else nothing is read.
    const batchSpan = startSpan('meterbox.delivery.batch', {
      'meterbox.destination': destination,
      'meterbox.keys': leased.length,
      'meterbox.calls': toCall.length,
    });
    const usageCalls = toCall.filter((c) => !c.correction);
    const traces =
      batchSpan.isRecording() && store.traceparents && usageCalls.length > 0
        ? await store
            .traceparents(
              usageCalls.map((c) => ({
                organizationId: c.key.organizationId,
                identifier: c.group.identifier,
              })),
            )
            .catch((err: unknown) => {
              deps.log.warn(
                { err },
                'could not read the trace contexts of a batch; its calls are traced apart',
              );
              return new Map<string, string[]>();
            })
        : undefined;
    callsOpen = true;
    const called = await callStripe(
      {
        ...(traces ? { traces, destination } : {}),
        transport,
        slots: !replicated
          ? NOT_REPLICATED
          : (dest?.slots ?? { take: async () => ({ granted: false, waitMs: 1_000 }) }),
        ...(dest?.corrections ? { corrections: dest.corrections } : {}),
        switchToCompensate: (key, identifier) => store.switchToCompensate(key, identifier, owner),
        ...(deps.observer ? { observer: deps.observer } : {}),
        ...(dest?.hold ? { hold: dest.hold } : {}),
        timers,
      },
      toCall,
      lease.deadline,
    ).finally(() => batchSpan.end());
    callsOpen = false;
    // What every answer means for its group, read once for the rules (answers.ts).
    const answers = readAnswers([...waiting, ...called], policy.validationMs);

    // 2b. what the calls said of the destination: a run of its failures makes it down (then they are
    // not the groups' failures: uncounted, the keys wait on it), a working answer ends an outage.
    let outage: { probeInMs: number; waitMs: number } | undefined;
    let recovered = false;
    let healthSeen: BatchReport['health'];
    if (health && called.length > 0) {
      const seen = afterCalls(called, gate, healthRules);
      if (seen.retryAfterMs > 0) await health.retryAfter(seen.retryAfterMs);
      if (seen.record) {
        const after = await health.record(seen.report, seen.refusal);
        healthSeen = {
          ...(seen.refusal !== undefined ? { refusal: seen.refusal } : {}),
          failures: seen.report.failures,
          after,
        };
        if (after.state === 'down') outage = { probeInMs: after.probeInMs, waitMs: seen.outageWaitMs };
        recovered = after.recovered;
      }
    }

    // 3. decide
    const decision = decideBatch({
      jobs: jobRefs,
      claimed,
      corrections,
      answers,
      pastWindow: plan.pastWindow,
      now: deps.clock.now(),
      policy,
      ...(outage ? { outage } : {}),
    });
    reportBatch(deps, {
      destination,
      ...(connected ? { account: connected.account } : {}),
      ...(healthSeen ? { health: healthSeen } : {}),
      notes: decision.notes,
    });
    if (decision.rateLimited) {
      await store
        .rateLimited()
        .catch((err: unknown) => deps.log.warn({ err }, 'could not slow the shared call budget after a 429'));
    }

    // 4. settle. With the process's lease connection (deps.leases), renewals go on until it has run: a
    // settle that waits for a pool connection (behind claims of tens of seconds on a slow database)
    // keeps its keys meanwhile; a renewal there never waits for a row the settle holds (SKIP LOCKED) and
    // finds nothing of this batch once the settle released its keys. Without it (renewals on the
    // batch's own connections, as the simulation models them) they stop first, as before.
    if (!deps.leases) await stopRenewing();
    const refused = await store
      .settle(decision.groups, decision.keys, {
        owner,
        minIntervalMs: config.DELIVERY_MIN_INTERVAL_MS,
      })
      .finally(stopRenewing);
    if (refused > 0) {
      // A frozen process, or a settle later than its lease: the keys' next owner (or the reaper's
      // job) resends the same identifiers, which the destination de-duplicates.
      deps.log.warn({ keys: refused, owner }, 'stale lease: answers left to the next owner of the keys');
      deps.observer?.onStaleLease?.(refused);
    }

    // 5. follow-ups and holds
    if (decision.holds.length > 0) {
      await store.hold(decision.holds);
      // A meter that turned up since the claim: its keys go now, not at the next catalog read.
      for (const eventName of new Set(decision.holds.map((k) => k.eventName))) {
        if (dest?.catalog?.sendable(eventName)) await dest.catalog.releaseHeld(eventName);
      }
    }
    if (decision.followUps.length > 0) {
      await store.queue(decision.followUps);
      for (const ms of new Set(decision.followUps.map((f) => f.afterMs))) deps.wakeAfter?.(ms);
    }
    // 5b. the destination is back: every key waiting on it resumes now (its job starts at once).
    if (recovered && health) {
      const resumed = await health.resumeWaiting();
      deps.log.info(
        { destination, ...(connected ? { account: connected.account } : {}), keys: resumed.length },
        'destination up again: waiting groups resume',
      );
      for (let i = 0; i < WAKE_FETCHERS; i++) deps.wakeAfter?.(0);
    } else if (health) {
      // Keys this batch told to wait whose wait it settled just after another batch ended the outage
      // (and woke the waiting keys before this settle set theirs): they resume too, not at the backstop.
      const waited = decision.notes.flatMap((n) => (n.kind === 'destination_wait' ? [n.key] : []));
      if (waited.length > 0 && (await health.callable())) {
        await health.resumeWaiting(waited);
        deps.wakeAfter?.(0);
      }
    }
    // 6. results
    return [...decision.results, ...done];
  } catch (err) {
    await stopRenewing();
    if (!callsOpen) {
      await store
        .release(owner, new Date(deps.clock.now().getTime() + config.DELIVERY_MIN_INTERVAL_MS))
        .catch((release: unknown) =>
          deps.log.warn({ err: release }, 'could not release the leases of a failed batch; they expire'),
        );
    }
    throw err;
  }
}

/** Fetchers of this process woken at an outage's end (the other processes' poll within a second). */
const WAKE_FETCHERS = 4;
