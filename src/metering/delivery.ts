// Delivery runtime: pg-boss fetchers that take meter-delivery jobs in batches (sized and spaced by
// fetch-policy.ts) and hand each batch to the pipeline (batch.ts) with the parts delivery-parts.ts
// builds once, the stranded-row sweep, the lease reaper (lease-reaper.ts) and shutdown. pg-boss stays the
// engine of wake-ups, retries with backoff, dead letters and the cron.
import type { Job } from 'pg-boss';
import { databaseResourceShortage, isPoolExhausted } from '../db/errors.js';
import { deliverBatch } from './batch.js';
import { batchSlots } from './batch-slots.js';
import { type DeliveryContext, type DeliveryWorkerOptions, deliveryParts } from './delivery-parts.js';
import { deadLetterKeys, endDeliveryJobs, markEnded } from './job-completion.js';
import { startLeaseReaper } from './lease-reaper.js';
import { deliveryJobOptions } from './outbox.js';
import type { QueuePayload } from './queues.js';
import { batchJobSlices } from './rules/jobs.js';
import { startOutboxSweep } from './sweep.js';

/** The readings' priority: their groups' batch jobs have it, a report's chunk's have less (outbox.ts). */
const READINGS_PRIORITY = deliveryJobOptions('', 'temperature_readings').priority ?? 1;

/** How long after a deferred job's start time its wake-up fires (start_after is compared in SQL). */
const WAKE_SLACK_MS = 5;

/** A batch that met a database short of a resource runs again after 0.5 s, 1 s, … at most 5 s apart. */
const RESOURCE_RETRY_FIRST_MS = 500;
const RESOURCE_RETRY_MAX_MS = 5_000;
/** How long one batch waits for the resource before its jobs fail as usual (they expire after 5 minutes). */
const RESOURCE_HOLD_MS = 120_000;

export interface DeliveryRuntime {
  /** Stops the sweep and wake-up timers; running batches finish. Call before boss.stop(). */
  stop(): void;
  /** Closes the lease connection: after boss.stop(), once no batch runs. */
  close(): Promise<void>;
}

/**
 * Starts outbox delivery and the stranded-row sweep in this process. Without a Stripe client
 * (no STRIPE_SECRET_KEY) nothing is delivered: rows stay pending, which the log says once.
 *
 * DELIVERY_CONCURRENCY fetchers, each its own pg-boss worker so it can be woken on its own: pg-boss
 * sleeps a fetcher for the poll interval after an empty fetch unless a NOTIFY arrives, and sends none
 * for deferred jobs (paced, busy); so a fetcher that just ran a batch fetches again at once, and a
 * deferred job wakes an idle fetcher when it comes due.
 */
export async function startDelivery(
  ctx: DeliveryContext,
  options: DeliveryWorkerOptions = {},
): Promise<DeliveryRuntime> {
  const log = ctx.log.child({ component: 'delivery' });
  let distributed = (await ctx.distributed?.()) ?? false;
  const fetchers: { id: string; busy: boolean }[] = [];
  const timers = new Set<NodeJS.Timeout>();
  let stopped = false;
  const wakeIdle = () => {
    const idle = fetchers.find((f) => !f.busy);
    if (idle) ctx.boss.notifyWorker(idle.id);
  };
  // A follow-up job was queued to start in `ms`: a fetcher of this process is woken then.
  const wakeAfter = (ms: number) => {
    if (stopped) return;
    const timer = setTimeout(() => {
      timers.delete(timer);
      if (!stopped) wakeIdle();
    }, ms + WAKE_SLACK_MS);
    timer.unref();
    timers.add(timer);
  };
  const parts = await deliveryParts(ctx, options, { log, distributed: () => distributed, wakeAfter });
  if (!parts) return { stop() {}, close: async () => {} };
  let deps = parts.depsFor(distributed);
  // A database moved onto a Citus cluster under a running worker (docs/scaling.md): the batches
  // after `meterbox citus distribute` committed take Citus's shapes, without a restart.
  const current = async () => {
    const now = (await ctx.distributed?.().catch(() => distributed)) ?? false;
    if (now !== distributed) {
      distributed = now;
      deps = parts.depsFor(now);
      log.info({ distributed: now }, 'the database is distributed now: delivery takes the Citus statements');
    }
    return deps;
  };
  /**
   * Runs a batch again while the database is short of a resource (a full disk, no memory, no free
   * connection: src/db/errors.ts), or while this process's own pool has no connection free within its
   * connect timeout (every connection held by slow statements: the process's shortage, not the
   * destination's nor the group's), instead of failing its jobs: a failed job spends one of its
   * DELIVERY_RETRY_LIMIT attempts and backs off exponentially, so an hour of full disk would have
   * dead-lettered jobs and delayed delivery long after space was back. The batch's jobs stay active
   * meanwhile (pg-boss expires them after 5 minutes, the hold ends well before); a batch that failed
   * after its calls resends the same identifiers, so running it again is what a retry does. Past the
   * hold, or once stopping, the error goes to pg-boss as before.
   */
  const whileShort = async <T>(run: () => Promise<T>): Promise<T> => {
    const started = Date.now();
    for (let waitMs = RESOURCE_RETRY_FIRST_MS; ; waitMs = Math.min(waitMs * 2, RESOURCE_RETRY_MAX_MS)) {
      try {
        return await run();
      } catch (err) {
        const short = databaseResourceShortage(err) ?? (isPoolExhausted(err) ? 'pool' : undefined);
        if (!short || stopped || Date.now() - started + waitMs > RESOURCE_HOLD_MS) throw err;
        if (short === 'pool') options.observer?.onPoolExhausted?.();
        else options.observer?.onDatabaseResourceError?.(short);
        const now = Date.now();
        if (now - (shortageLoggedAt.get(short) ?? 0) >= RESOURCE_RETRY_MAX_MS) {
          shortageLoggedAt.set(short, now);
          log.warn(
            { err, kind: short },
            short === 'pool'
              ? "no connection of this process's pool was free within its connect timeout; delivery batches wait and run again"
              : 'the database is short of a resource; delivery batches wait and run again',
          );
        }
        await new Promise((resolve) => setTimeout(resolve, waitMs));
      }
    }
  };
  const shortageLoggedAt = new Map<string, number>();
  /** A batch that failed: logged, and the error handed back for pg-boss to fail (and retry) its job. */
  const failed = async (err: unknown, fields: Record<string, number>, message: string) => {
    log.warn({ err, ...fields }, message);
    // A single-node statement on a database distributed since the last look fails: look again now.
    if (!distributed) await ctx.distributed?.({ recheck: true }).catch(() => false);
    return err;
  };
  const fetcherCount = Math.min(ctx.config.DELIVERY_CONCURRENCY, ctx.config.DELIVERY_MAX_IN_FLIGHT);
  const { transport, metronomeTransport, db, leases } = parts;
  const { batchSize, workOptions, gate, batchGate } = parts.fetch;
  // DELIVERY_CONCURRENCY batches at once in this process, whichever queue fetched them.
  const running = batchSlots(fetcherCount);
  for (let i = 0; i < fetcherCount; i++) {
    const fetcher = { id: '', busy: false };
    fetchers.push(fetcher);
    fetcher.id = await ctx.boss.work(
      'meter-delivery',
      workOptions,
      async (jobs: Job<QueuePayload<'meter-delivery'>>[]) => {
        fetcher.busy = true;
        const alive = leases.touchWhileRunning(jobs.map((j) => j.id));
        const slot = await running.take();
        try {
          const results = await whileShort(() => current().then((deps) => deliverBatch(deps, jobs)));
          // Each job ends with its outcome, by primary key (job-completion.ts); a failure here fails
          // the jobs still active, as pg-boss's own settle failing did.
          await endDeliveryJobs(db, ctx.boss, jobs, results);
          // pg-boss's completion after this handler changes nothing now: not sent (job-completion.ts).
          markEnded(jobs);
          // Before this fetcher fetches again (pg-boss fetches when the handler returns).
          await gate(jobs.length);
        } catch (err) {
          throw await failed(err, { jobs: jobs.length }, 'delivery batch failed; its jobs are retried');
        } finally {
          slot.release();
          await alive.stop();
          fetcher.busy = false;
          // Fetch again without the poll delay; only an empty fetch puts this fetcher to sleep.
          ctx.boss.notifyWorker(fetcher.id);
        }
      },
    );
  }
  // meter-delivery-batch: one job at a time a fetcher, its keys delivered as batches of per-key jobs
  // (rules/jobs.ts batchJobSlices), slice after slice. The job completes when its handler returns (pg-boss's
  // own completion: one row); a key that is dead-lettered gets its own dead letter (deadLetterKeys); a
  // failed slice fails the job, which pg-boss retries with backoff (the slices before it find their keys
  // delivered: nothing pending). As many fetchers as meter-delivery's, all sharing the process's slots:
  // so delivery keeps pace with the report's chunks, and the report lasts as long as its pace
  // (ACTIVE_SENSORS_PER_SECOND) says. With half as many, delivery fell 12-14 s behind the chunks of a
  // report of 100,000 and was a second, hidden pace (docs/benchmarks.md, "The report's delivery keeps
  // pace with its chunks").
  //
  // A job of less than half a batch of keys (a group's idle keys, src/ingest/queued-in-statement.ts, a
  // handful each) takes the readings' batch jobs queued beside it along, up to about a batch's worth of
  // keys (fetchBesides): a fetch per group's job would cost a claim and a settle per handful of keys,
  // where a key's own jobs are fetched a batch at a time. Only the readings' jobs (minPriority): a
  // report's chunk stays one fetcher's, so the report's chunks are delivered side by side.
  const fetchBesides = async (keys: number): Promise<Job<QueuePayload<'meter-delivery-batch'>>[]> => {
    if (keys * 2 >= batchSize) return [];
    return ctx.boss.fetch<QueuePayload<'meter-delivery-batch'>>('meter-delivery-batch', {
      batchSize: Math.max(1, Math.floor((batchSize - keys) / keys)),
      minPriority: READINGS_PRIORITY,
      includeMetadata: false,
    });
  };
  for (let i = 0; i < fetcherCount; i++) {
    const fetcher = { id: '' };
    fetcher.id = await ctx.boss.work(
      'meter-delivery-batch',
      { ...workOptions, batchSize: 1 },
      async ([job]: Job<QueuePayload<'meter-delivery-batch'>>[]) => {
        if (!job) return;
        const slot = await running.take();
        let besides: Job<QueuePayload<'meter-delivery-batch'>>[] = [];
        try {
          besides = await fetchBesides(job.data.keys.length);
          for (const slice of batchJobSlices([job, ...besides], batchSize)) {
            const results = await whileShort(() => current().then((deps) => deliverBatch(deps, slice)));
            const data = new Map(slice.map((j) => [j.id, j.data]));
            await deadLetterKeys(
              db,
              ctx.boss,
              results.flatMap((r) =>
                r.status === 'deadletter' ? [{ data: data.get(r.id)!, output: r.output }] : [],
              ),
            );
          }
          // The job the handler was given completes when it returns (pg-boss); those fetched beside it here.
          if (besides.length > 0) {
            await ctx.boss.complete(
              'meter-delivery-batch',
              besides.map((j) => j.id),
            );
          }
          // Before this fetcher fetches again (pg-boss fetches when the handler returns), its slot free.
          slot.release();
          await batchGate(job.data.keys.length + besides.reduce((n, j) => n + j.data.keys.length, 0));
        } catch (err) {
          // Each job fetched beside it fails too, for pg-boss to retry with backoff (or expires, should
          // this fail as well: a batch job's expiry).
          if (besides.length > 0) {
            await ctx.boss
              .fail(
                'meter-delivery-batch',
                besides.map((j) => j.id),
              )
              .catch(() => undefined);
          }
          throw await failed(
            err,
            { keys: job.data.keys.length + besides.reduce((n, j) => n + j.data.keys.length, 0) },
            'delivery batch failed; its batch jobs are retried',
          );
        } finally {
          slot.release();
          ctx.boss.notifyWorker(fetcher.id);
        }
      },
    );
  }
  const sweep = await startOutboxSweep({
    db,
    boss: ctx.boss,
    config: ctx.config,
    log,
    distributed: async () => (await ctx.distributed?.()) ?? false,
  });
  const reaper = startLeaseReaper({
    ...ctx,
    db,
    distributed: () => distributed,
    log,
    wake: wakeIdle,
    leaseLength: parts.leaseLength,
    ...(parts.nodes ? { nodes: parts.nodes } : {}),
  });
  log.debug(
    {
      fetchers: fetcherCount,
      batchSize,
      transport: transport.kind,
      metronome: metronomeTransport !== undefined,
    },
    'delivery started',
  );
  return {
    stop() {
      stopped = true;
      for (const t of timers) clearTimeout(t);
      timers.clear();
      sweep.stop();
      reaper.stop();
    },
    close: parts.closePools,
  };
}
