// The worker processes: each runs the real batch (src/metering/batch.ts, the code under test) in its
// fetchers, its lease reaper, the active-sensor report at start-up and on the hourly schedule, and
// reads the meter catalog, all through the modelled database and destinations. Also the spin check:
// a key's jobs that neither call nor wait for a reason are work for nothing.
//
// Why this file is long: one worker process read in order, as delivery.ts's runtime is: its per-key and
// batch fetchers, reaper, hourly report and catalog share the process's state (alive, slots, host clock).

import { pino } from 'pino';
import type { Destination, MeterEventName } from '../../src/db/schema.js';
import type { Logger } from '../../src/log.js';
import { utcHourOf } from '../../src/metering/active-sensors.js';
import { deliverBatch } from '../../src/metering/batch.js';
import { batchSlots } from '../../src/metering/batch-slots.js';
import { adaptiveLeaseLength } from '../../src/metering/lease-length.js';
import { MAX_BATCH_KEYS, queues } from '../../src/metering/queues.js';
import { batchJobSlices } from '../../src/metering/rules/jobs.js';
import {
  type KeyRef,
  keyName,
  keyRef,
  leaseGrantedTo,
  singletonKeyOf,
} from '../../src/metering/rules/keys.js';
import type { Database } from './database.js';
import type { Destinations } from './destinations.js';
import { HOSTS } from './hostile.js';
import type { Job } from './model.js';
import {
  awakeNow,
  CATALOG_HELD_REFRESH_SECONDS,
  CATALOG_REFRESH_SECONDS,
  destinationsAt,
  IDLE_POLL_MS,
  notifyAll,
  notifyBatch,
  REAP_MS,
  START,
  type Worker,
  type World,
} from './world.js';

/**
 * The batch's logger: silent, and without the redaction the service's logger sets up (each child
 * logger of a batch would compile it again). One for every seed: a silent logger keeps no state.
 */
const SILENT: Logger = pino({ level: 'silent' });

export interface Workers {
  /** A new worker process, started now. */
  start(): Worker;
  /** The meter catalog read again (meter-catalog.ts): its held keys released for meters that are back. */
  refreshCatalog(): void;
}

/**
 * The worker processes of a world, none started yet: schedules the meter catalog's refresh and the
 * hourly report, and wakes idle fetchers when a job is queued.
 */
export function workersOf(world: World, database: Database, destinations: Destinations): Workers {
  const { sched, db, spec, mutations, stripe, log, violate, now, dbNow } = world;
  const { statement, storeOf, slotsOf, claimsRunning } = database;
  const idleRuns = new Map<string, number[]>();

  // ── the meter catalog (meter-catalog.ts): one view, refreshed on a timer or on a report ──
  const view: Record<MeterEventName, boolean> = { temperature_readings: true, active_sensors: true };
  const releaseHeld = (eventName: MeterEventName) => {
    if (!view[eventName]) return;
    const keys = db.releaseHeld(eventName);
    for (const k of keys) db.insertJob(k, dbNow());
    if (keys.length > 0) {
      log(`catalog released ${keys.length} held ${eventName} keys`);
      notifyAll(world);
    }
  };
  const refreshCatalog = () => {
    for (const m of ['temperature_readings', 'active_sensors'] as const) {
      if (view[m] !== stripe.meters[m]) log(`catalog: ${m} ${stripe.meters[m] ? 'back' : 'missing'}`);
      view[m] = stripe.meters[m];
      if (view[m]) releaseHeld(m);
    }
  };
  const scheduleCatalog = () => {
    const seconds = Object.values(view).every(Boolean)
      ? CATALOG_REFRESH_SECONDS
      : CATALOG_HELD_REFRESH_SECONDS;
    sched.after(seconds * 1000, () => {
      refreshCatalog();
      scheduleCatalog();
    });
  };
  scheduleCatalog();

  // pg-boss wakes an idle fetcher when a job is queued (NOTIFY) and the process's own timer when a
  // deferred job comes due (delivery.ts wakeAfter); the poll is only a backstop.
  db.onJob = (startAfter) => {
    if (startAfter <= dbNow()) notifyAll(world);
    else sched.after(startAfter - dbNow() + 5, () => notifyAll(world));
  };

  db.onBatchJob = (startAfter) => {
    if (startAfter <= dbNow()) notifyBatch(world);
    else sched.after(startAfter - dbNow() + 5, () => notifyBatch(world));
  };

  // ── the hourly active-sensor report (active-sensors-job.ts): at a worker's start-up and on the
  // hourly schedule, whose job the database's clock creates; the hour it reports is the database's.
  // Its chunk (one here: a world has a few organizations) writes a row for every billable organization
  // at each destination in force at the hour and hands their keys to delivery as meter-delivery-batch
  // jobs in the same transaction (active-sensors.ts handOff); a run that fails is retried as pg-boss
  // retries the report's job ──
  const reportJob = queues['active-sensors-report'].options(world.config);
  const targetsAt = (hour: number) =>
    world.customers.flatMap((c, i) =>
      destinationsAt(c, hour).map((d) => ({
        organizationId: c.organizationId,
        customerId: d.customerId,
        eventName: 'active_sensors' as const,
        ...(d.destination === 'stripe' ? {} : { destination: d.destination }),
        // The organization's count of active sensors (no sensors are modelled): drawn from nothing, so
        // no stream of the seed moves; 0 now and then, as an organization with every sensor inactive.
        value: BigInt((i * 7 + Math.floor(hour / 3_600_000)) % 6),
      })),
    );
  const reportHour = (w: Worker, trigger: string, attempt = 0) => {
    // Once the world quiets nothing new is written (as no reading arrives): the ledger is read at rest.
    if (!w.alive || world.quiet) return;
    const at = mutations.has('reportHourFromHostClock') ? world.wallClockOf(w.host)() : dbNow();
    const hour = utcHourOf(new Date(at)).getTime();
    const dbHour = utcHourOf(new Date(dbNow())).getTime();
    world.counts.reports++;
    log(`${w.id} ${trigger} active-sensor report for ${new Date(hour).toISOString()}`);
    if (hour !== dbHour)
      violate(
        `${w.id}'s ${trigger} report is stamped ${new Date(hour).toISOString()} while the database is in ${new Date(dbHour).toISOString()}`,
      );
    statement(w, () => db.report(hour, targetsAt(hour), MAX_BATCH_KEYS), { mayFail: true }).then(
      ({ rows, jobs }) => {
        if (rows.length > 0)
          log(
            `${w.id} reported ${rows.length} rows, batch jobs ${jobs.map((j) => `${j.id}[${j.keys.length}]`).join(' ')}`,
          );
      },
      (err: unknown) => {
        log(`${w.id} report failed: ${err instanceof Error ? err.message : String(err)}`);
        if (attempt >= (reportJob.retryLimit ?? 0)) return;
        // pg-boss's retry of the report's job, on whichever process fetches it.
        sched.after((reportJob.retryDelay ?? 30) * 1000 * 2 ** attempt, () => {
          const x = world.workers.find((y) => y.alive);
          if (x) x.gate(() => reportHour(x, 'retried', attempt + 1));
        });
      },
    );
  };
  const hourly = () => {
    const w = world.workers.find((x) => x.alive);
    if (w) w.gate(() => reportHour(w, 'hourly'));
    const nextHour = utcHourOf(new Date(dbNow())).getTime() + 3_600_000;
    sched.after(nextHour - dbNow() + 1, hourly);
  };
  sched.after(utcHourOf(new Date(dbNow())).getTime() + 3_600_000 - dbNow() + 1, hourly);

  let workerCount = 0;
  const start = (): Worker => {
    const w: Worker = {
      id: `w${workerCount++}`,
      alive: true,
      reapArmed: false,
      reap: () => {},
      inFlight: new Set(),
      wake: [],
      wakeBatch: [],
      host: workerCount % HOSTS,
      frozenUntil: Number.NEGATIVE_INFINITY,
      frozenFrom: 0,
      frozenBeforeMs: 0,
      gate: (run) => {
        const thawed = () => {
          if (w.frozenUntil > sched.now) sched.after(w.frozenUntil - sched.now, thawed);
          else run();
        };
        thawed();
      },
    };
    world.workers.push(w);
    w.gate(() => reportHour(w, 'start-up'));
    const wall = world.wallClockOf(w.host);
    // Elapsed time on the host's monotonic clock (true time here); the mutation measures it on the
    // wall clock, which is skewed and steps.
    const timers = {
      ...sched.timers(() => w.alive, w.gate, mutations.has('deadlineOnWallClock') ? wall : undefined),
      // What its claims and renewals took is timed on its awake clock: its freezes left out.
      ...(mutations.has('leaseLearnsStalls') ? {} : { awake: () => awakeNow(world, w) }),
    };
    // As a worker's runtime: its batches' lease length follows its recent claims (on its timers), and
    // its reaper's orphan check waits for that lease.
    const leaseLength = adaptiveLeaseLength(world.config, { now: () => sched.now });
    const deps = {
      db: undefined as never,
      boss: undefined as never,
      store: (destination: Destination) => storeOf(w, destination),
      transport: destinations.transportOf(w),
      slots: slotsOf(w, 'stripe'),
      corrections: destinations.correctionsOf(w),
      catalog: {
        sendable: (m: MeterEventName) => view[m],
        releaseHeld: async (m: MeterEventName) => releaseHeld(m),
      },
      metronome: {
        transport: destinations.metronomeTransportOf(w),
        slots: slotsOf(w, 'metronome'),
        corrections: destinations.metronomeCorrectionsOf(w),
        // Metronome's billable metrics never go missing in these worlds.
        catalog: { sendable: () => true, releaseHeld: async () => {} },
      },
      config: world.config,
      owner: w.id,
      // What processes share is on the database's clock (a host's wall clock is wrong by minutes).
      clock: { now: () => new Date(mutations.has('leaseFromHostClock') ? wall() : dbNow()) },
      log: SILENT,
      timers,
      leaseLength,
      wakeAfter: (ms: number) => sched.after(ms + 5, () => notifyAll(world)),
    };
    const batchSize = spec.batchSize;
    const idle = (list: (() => void)[]) =>
      new Promise<void>((resolve) => {
        let woken = false;
        let cancelPoll = () => {};
        const wake = () => {
          if (woken || !w.alive) return;
          woken = true;
          cancelPoll();
          const at = list.indexOf(wake);
          if (at >= 0) list.splice(at, 1);
          resolve();
        };
        list.push(wake);
        cancelPoll = sched.after(list === w.wake ? IDLE_POLL_MS : 600_000, wake);
      });
    // DELIVERY_CONCURRENCY batches at once in the process, whichever queue fetched them (delivery.ts).
    const running = batchSlots(spec.fetchers);
    /** pg-boss's fetch: a batch of due jobs, made active for this process. */
    const fetchJobs = () =>
      statement(w, () => {
        const fetched = db.fetch(batchSize, w.id);
        for (const x of world.workers) if (x.alive && fetched.length > 0) x.reap();
        return fetched;
      });
    /** The batch (the code under test); its jobs completed, or failed for pg-boss to retry. */
    const runBatch = async (jobs: Job[]) => {
      // By the key's name: a hand-off's job has a name of its own (model.ts insertJob).
      const before = new Map(
        jobs.map((j) => [singletonKeyOf(j.key), world.callsPerKey.get(singletonKeyOf(j.key)) ?? 0]),
      );
      let results: { id: string; status: string; output?: unknown }[];
      try {
        results = await deliverBatch(
          deps,
          jobs.map((j) => ({ id: j.id, data: j.key, retryCount: j.retryCount, retryLimit: 20 })),
        );
      } catch (err) {
        world.counts.batchFailures++;
        world.lastDisruption = now();
        log(`${w.id} batch of ${jobs.length} failed: ${err instanceof Error ? err.message : String(err)}`);
        await statement(w, () => {
          for (const j of jobs) db.fail(j.id);
        });
        return;
      }
      await statement(w, () => {
        for (const r of results)
          db.finish(r.id, r.status === 'deadletter' ? 'deadletter' : 'completed', r.output);
      });
      watchRuns(jobs, results, before);
    };
    const fetcher = async () => {
      while (w.alive) {
        try {
          const jobs = await fetchJobs();
          if (jobs.length === 0) await idle(w.wake);
          else {
            const slot = await running.take();
            try {
              await runBatch(jobs);
            } finally {
              slot.release();
            }
          }
        } catch (err) {
          // A statement of pg-boss's own failed (a lost or silent connection): it tries again soon.
          world.lastDisruption = now();
          log(`${w.id} fetcher: ${err instanceof Error ? err.message : String(err)}`);
          await timers.sleep(1_000);
        }
      }
    };
    /**
     * A meter-delivery-batch job (delivery.ts): its keys through the real batch in slices of the batch
     * size (rules/jobs.ts batchJobSlices), one after another; a key dead-lettered gets its own dead letter
     * (job-completion.ts deadLetterKeys); the job completes when every slice is through, and fails (for
     * pg-boss to retry) when one throws.
     */
    const runBatchJob = async (job: { id: string; keys: readonly KeyRef[]; retryCount: number }) => {
      const retryLimit = db.batchBoss.retryLimit;
      const slices = batchJobSlices(
        [{ id: job.id, retryCount: job.retryCount, data: { keys: job.keys.map((k) => ({ ...k })) } }],
        batchSize,
      );
      try {
        let through = 0;
        for (const slice of slices) {
          const keyOf = new Map(
            slice.map((s) => [s.id, keyRef({ ...s.data, organizationId: s.data.organizationId ?? '' })]),
          );
          const ran = slice.map((s) => ({
            id: s.id,
            key: keyOf.get(s.id)!,
            name: singletonKeyOf(keyOf.get(s.id)!),
            origin: 'write' as const,
            retryCount: job.retryCount,
          }));
          const before = new Map(ran.map((j) => [j.name, world.callsPerKey.get(j.name) ?? 0]));
          const results = await deliverBatch(
            deps,
            slice.map((s) => ({ id: s.id, data: s.data, retryCount: job.retryCount, retryLimit })),
          );
          const dead = results.flatMap((r) =>
            r.status === 'deadletter' ? [{ key: keyOf.get(r.id)!, output: r.output }] : [],
          );
          if (dead.length > 0) await statement(w, () => db.deadLetterKeys(dead));
          through += slice.length;
          const held = db.batchJobs.get(job.id);
          if (held?.state === 'active' && held.worker === w.id && held.retryCount === job.retryCount)
            held.through = through;
          watchRuns(ran, results, before);
        }
      } catch (err) {
        world.counts.batchFailures++;
        world.lastDisruption = now();
        log(`${w.id} batch job ${job.id} failed: ${err instanceof Error ? err.message : String(err)}`);
        await statement(w, () => db.endBatchJob(job.id, job.retryCount, 'failed'));
        return;
      }
      await statement(w, () => db.endBatchJob(job.id, job.retryCount, 'completed'));
    };
    const batchFetcher = async () => {
      while (w.alive) {
        try {
          const job = await statement(w, () => {
            const b = db.fetchBatchJob(w.id);
            return b ? { id: b.id, keys: [...b.keys], retryCount: b.retryCount } : null;
          });
          if (!job) {
            await idle(w.wakeBatch);
            continue;
          }
          log(`${w.id} fetched batch job ${job.id} (${job.keys.length} keys, retry ${job.retryCount})`);
          const slot = await running.take();
          try {
            await runBatchJob(job);
          } finally {
            slot.release();
          }
        } catch (err) {
          world.lastDisruption = now();
          log(`${w.id} batch fetcher: ${err instanceof Error ? err.message : String(err)}`);
          await timers.sleep(1_000);
        }
      }
    };
    for (let i = 0; i < spec.fetchers; i++) void fetcher();
    // As many as meter-delivery's, sharing the process's slots (delivery.ts).
    for (let i = 0; i < spec.fetchers; i++) void batchFetcher();
    // The lease reaper (lease-reaper.ts startLeaseReaper), every REAP_MS; the simulation runs its ticks
    // only while a lease exists anywhere (they would find nothing else), to keep long runs fast.
    w.reap = () => {
      if (w.reapArmed) return;
      w.reapArmed = true;
      sched.after(REAP_MS - ((now() - START) % REAP_MS), function tick() {
        if (!w.alive) return;
        if (!anyLease() && !anyActiveJob()) {
          w.reapArmed = false;
          return;
        }
        sched.after(REAP_MS, tick);
        void reapOnce().catch((err: unknown) =>
          log(`${w.id} reaper: ${err instanceof Error ? err.message : String(err)}`),
        );
      });
    };
    const anyLease = () => {
      for (const k of db.keys.values()) if (k.leaseOwner !== null) return true;
      return false;
    };
    const anyActiveJob = () => {
      for (const j of db.jobs.values()) if (j.state === 'active') return true;
      return false;
    };
    /** One pass of the reaper: expired leases and orphaned jobs, queued again. */
    // lease-reaper.ts reapOnce: the expired leases read and the orphaned jobs found; then their keys queued,
    // the orphans completed and the leases freed (a lease that ran out meanwhile queued too), in that
    // order, so that no instant leaves such a key with neither a lease nor a job. (One statement here
    // for the last four: between them every key has its job.)
    const reapOnce = () => {
      // The product's slack: a lease that ran out within this process's lease growth is left to its owner.
      const slackMs = leaseLength.takeOverAfterSeconds() * 1000;
      return statement(w, () => db.expiredLeaseKeys(slackMs)).then(async (expired) => {
        const orphans = await statement(w, () => {
          const found = db.orphans(Math.max(spec.leaseSeconds, leaseLength.seconds()) * 1000, slackMs);
          for (const j of found)
            if (claimsRunning.has(keyName(j.key)))
              violate(
                `the reaper requeued job ${j.id} of ${j.name} while a claim of its key was still running`,
              );
          return found;
        });
        if (expired.length + orphans.length === 0) return;
        const keys = await statement(w, () => {
          const first = [...expired, ...orphans.map((j) => j.key)];
          // Mutation reaperForgetsKeys: the keys are freed and their jobs completed, none queued.
          const forget = mutations.has('reaperForgetsKeys');
          if (!forget) for (const k of first) db.insertJob(k, dbNow());
          for (const j of orphans) db.finish(j.id, 'completed', { kind: 'orphaned' });
          // A lease a redrive revoked was counted as taken over then (load.ts).
          const revoked = new Set(
            [...db.keys].flatMap(([name, r]) =>
              r.leaseOwner && leaseGrantedTo(r.leaseOwner) !== r.leaseOwner ? [name] : [],
            ),
          );
          const reaped = db.reap(slackMs);
          world.counts.takeovers += reaped.filter((k) => !revoked.has(keyName(k))).length;
          const seen = new Set(first.map(keyName));
          for (const k of reaped) if (!seen.has(keyName(k)) && !forget) db.insertJob(k, dbNow());
          return reaped;
        });
        log(`${w.id} reaped ${keys.length} leases, ${orphans.length} orphaned jobs`);
      });
    };
    // A worker starts its reaper at once (another's leases or jobs may be waiting for it).
    w.reap();
    log(`${w.id} started`);
    return w;
  };

  /** Spin and churn: a key's jobs that neither call nor wait for a reason (busy, paced, backoff) are work for nothing. */
  const watchRuns = (
    jobs: readonly Pick<Job, 'id' | 'key' | 'name' | 'origin' | 'retryCount'>[],
    results: readonly { id: string; output?: unknown }[],
    before: Map<string, number>,
  ) => {
    for (const j of jobs) {
      const output = results.find((r) => r.id === j.id)?.output as
        | { kind?: string; next?: string }
        | undefined;
      if (output?.kind === 'meter_missing') {
        // A held key costs nothing while its meter stays missing: the run that finds it held queues
        // nothing for it (the catalog queues it when the meter is back).
        log(`job ${j.id} of ${j.name} found its meter missing (${j.origin}, retry ${j.retryCount})`);
        if (output.next)
          violate(`held key ${j.name} was queued again (${String(output.next)}) by the run that held it`);
        continue;
      }
      const name = singletonKeyOf(j.key);
      if ((world.callsPerKey.get(name) ?? 0) > (before.get(name) ?? 0)) continue;
      const runs = (idleRuns.get(name) ?? []).filter((t) => t > now() - 10_000);
      runs.push(now());
      idleRuns.set(name, runs);
      if (runs.length > 30) violate(`key ${name} ran ${runs.length} jobs in 10 s without a call (a spin)`);
    }
  };

  return { start, refreshCatalog };
}
