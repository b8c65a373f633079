// The worker's meter catalog ("never into the void"): which meter event names have an active meter
// at Stripe with the settings meterbox sends. Stripe accepts a meter event for a missing or
// deactivated meter and drops it later, so delivery holds an event name's rows until its meter is
// there. Learnt at start-up, every METER_CATALOG_REFRESH_SECONDS, and at once when the API records
// a no_meter/archived_meter error report (it NOTIFYs METER_CATALOG_CHANNEL in the webhook's
// transaction; a missed notification costs at most one refresh interval). Its listener is trusted
// only while its heartbeat is answered (a silently dead connection hears nothing): while it is not,
// the meters are read every few seconds instead, and a missed heartbeat replaces the connection.
import type { Kysely } from 'kysely';
import pg from 'pg';
import type { PgBoss } from 'pg-boss';
import type Stripe from 'stripe';
import { METER_CATALOG_CHANNEL } from '../billing/meter-error-reports.js';
import { listAccountMeters, METER_SPECS, meterStateOf } from '../billing/stripe-account.js';
import {
  type ConnectionWatch,
  destroyClient,
  ListenerHeartbeat,
  listenerClientOptions,
} from '../db/dead-connections.js';
import type { DB, MeterEventName } from '../db/schema.js';
import { assertOwnSession, POOLED_LISTEN_FIX, PooledSessionError } from '../db/session.js';
import type { Logger } from '../log.js';
import type { Metrics } from '../observability/metrics.js';
import { releaseHeldKeys as endHolds, type HoldScope } from './hold-sql.js';
import { queueDeliveries } from './outbox.js';

export { METER_CATALOG_CHANNEL };

export type CatalogState = 'active' | 'missing' | 'inactive' | 'mismatch' | 'unknown';

export interface CatalogEntry {
  eventName: MeterEventName;
  state: CatalogState;
  meterId: string | null;
  /** Why the event name is held, in words for the log, the dashboard and readiness. */
  detail: string;
}

export interface MeterCatalog {
  /** True when the event name's meter is active and fits: its rows may be sent. */
  sendable(eventName: MeterEventName): boolean;
  /** Event names held now (no active, fitting meter, or the meters could not be read yet). */
  missing(): readonly MeterEventName[];
  entries(): readonly CatalogEntry[];
  /** The active meter's id (for reconciliation against Stripe's summaries), when known. */
  meterId(eventName: MeterEventName): string | undefined;
  /** Reads the account's meters now (concurrent calls share one read). */
  refresh(): Promise<void>;
  /**
   * Called by a batch right after it put keys on hold: when the meter turned up meanwhile (the
   * refresh's own release ran before the hold was written), queues the event name's held keys now.
   */
  releaseHeld(eventName: MeterEventName): Promise<void>;
}
export interface MeterCatalogRuntime extends MeterCatalog {
  stop(): Promise<void>;
}

const FIX = 'run `meterbox stripe setup` (then `meterbox stripe check`)';
/** Retry interval while the account's meters have never been read (a Stripe outage at start-up). */
const UNKNOWN_RETRY_SECONDS = 5;
/** Refresh interval while a meter is missing (its keys are held by name until a read sees it back). */
const HELD_REFRESH_SECONDS = 5;
/** Refresh interval while the listener is not proven alive (a no_meter report might not be heard). */
const UNHEARD_REFRESH_SECONDS = 5;

/** Keys queued in one pg-boss insert when a meter comes back. */
const RELEASE_CHUNK = 1_000;

/**
 * A meter is back: every key held for it (a named hold, no job meanwhile) gets its job now. Two
 * statements however many keys are held (plus one insert per RELEASE_CHUNK keys). Keys released
 * but not queued (a crash in between) have stale rows, which the sweep queues.
 */
async function releaseHeldKeys(
  db: Kysely<DB>,
  boss: PgBoss,
  eventName: MeterEventName,
  distributed: (() => Promise<boolean>) | undefined,
  scope?: HoldScope,
): Promise<number> {
  const keys = await endHolds(
    db,
    eventName,
    { distributed: (await distributed?.()) ?? false },
    'stripe',
    scope,
  );
  for (let i = 0; i < keys.length; i += RELEASE_CHUNK) {
    await queueDeliveries(boss, keys.slice(i, i + RELEASE_CHUNK));
  }
  return keys.length;
}

/** What one read of the account's meters says about each event name meterbox sends. */
export function catalogEntries(meters: readonly Stripe.Billing.Meter[]): CatalogEntry[] {
  return METER_SPECS.map((spec): CatalogEntry => {
    const state = meterStateOf(spec, meters);
    switch (state.kind) {
      case 'ok':
        return { eventName: spec.eventName, state: 'active', meterId: state.meter.id, detail: '' };
      case 'mismatch':
        return {
          eventName: spec.eventName,
          state: 'mismatch',
          meterId: state.meter.id,
          detail: `meter ${state.meter.id} does not fit: ${state.differences.join(', ')}`,
        };
      case 'inactive':
        return {
          eventName: spec.eventName,
          state: 'inactive',
          meterId: state.meter.id,
          detail: `meter ${state.meter.id} is deactivated`,
        };
      default:
        return {
          eventName: spec.eventName,
          state: 'missing',
          meterId: null,
          detail: `no meter with event name ${spec.eventName}`,
        };
    }
  });
}

/**
 * Builds the catalog, reads the meters once (a failure leaves every event name `unknown`, i.e. held,
 * and is retried at the next refresh) and starts the refresh timer and the NOTIFY listener.
 */
export async function startMeterCatalog(deps: {
  stripe: Stripe;
  db: Kysely<DB>;
  boss: PgBoss;
  log: Logger;
  metrics: Metrics;
  refreshSeconds: number;
  /** Whether the database is distributed now (Database.distributed); without it: one node. */
  distributed?: () => Promise<boolean>;
  /**
   * A direct (session) connection for LISTEN; without it only the timer refreshes. One that turns
   * out to go through a transaction pooler, where LISTEN "succeeds" and then hears nothing, is not
   * listened on: the catalog says so once and relies on the timer.
   */
  listenConnectionString?: string | undefined;
  /** Heartbeat interval of the listener (ms); default 2 s. */
  heartbeatMs?: number;
  /** Counts a listener replaced for a missed heartbeat. */
  watch?: ConnectionWatch;
  /**
   * Stripe Connect: with each connected account's meters read on their own (account-meter-catalogs.ts),
   * the platform's meters free only the platform's customers' held keys. Without it, every customer's.
   */
  platformOnly?: boolean;
  /**
   * Stripe answered the meter list 401 (the platform's key refused): recorded as delivery's key hold
   * (destination-health.ts), so a worker started with a bad key says so, not "meter missing".
   */
  keyRefused?: (message: string) => Promise<void>;
  /** A no_meter/archived_meter report was heard (Stripe Connect: the accounts' catalogs read again too). */
  onReport?: () => void;
}): Promise<MeterCatalogRuntime> {
  const scope: HoldScope = deps.platformOnly ? { account: null } : undefined;
  const log = deps.log.child({ component: 'meter-catalog' });
  let entries: CatalogEntry[] = METER_SPECS.map((spec) => ({
    eventName: spec.eventName,
    state: 'unknown',
    meterId: null,
    detail: 'the account’s meters have not been read yet',
  }));
  let running: Promise<void> | undefined;
  let again = false;
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;

  const publish = async (next: CatalogEntry[]) => {
    // The new state is visible before held jobs are released: a job that re-queues its key after
    // the release sees its meter sendable and releases the key itself (see releaseHeld).
    const previous = entries;
    entries = next;
    for (const entry of next) {
      const before = previous.find((e) => e.eventName === entry.eventName);
      deps.metrics.stripeMeterMissing.set({ event_name: entry.eventName }, entry.state === 'active' ? 0 : 1);
      if (entry.state !== 'active' && (before?.state !== entry.state || before.detail !== entry.detail)) {
        log.warn(
          { eventName: entry.eventName, state: entry.state, meterId: entry.meterId, fix: FIX },
          `Stripe meter for ${entry.eventName} unusable (${entry.detail}): its usage is held pending; ${FIX}`,
        );
      } else if (entry.state === 'active') {
        // Every read, not only on the change: keys held by a batch that raced the change are freed too
        // (the held-key index makes the look free when there are none).
        const released = await releaseHeldKeys(deps.db, deps.boss, entry.eventName, deps.distributed, scope);
        if (before && before.state !== 'active') {
          log.info(
            { eventName: entry.eventName, meterId: entry.meterId, released },
            'Stripe meter available: delivery resumes',
          );
        }
      }
    }
    // For the API process (dashboard, its metrics), which has no catalog of its own.
    await deps.db
      .insertInto('stripe_meter_catalog')
      .values(
        next.map((e) => ({
          event_name: e.eventName,
          state: e.state,
          meter_id: e.meterId,
          detail: e.detail,
          checked_at: new Date(),
        })),
      )
      .onConflict((oc) =>
        oc.column('event_name').doUpdateSet((eb) => ({
          state: eb.ref('excluded.state'),
          meter_id: eb.ref('excluded.meter_id'),
          detail: eb.ref('excluded.detail'),
          checked_at: eb.ref('excluded.checked_at'),
        })),
      )
      .execute();
  };

  const readOnce = async () => {
    try {
      const meters = await listAccountMeters(deps.stripe);
      await publish(catalogEntries(meters));
    } catch (err) {
      // Keep what was known; before the first read everything stays `unknown`, i.e. held.
      const message = err instanceof Error ? err.message : String(err);
      log.warn({ err: message }, 'reading Stripe meters failed');
      if ((err as { statusCode?: number })?.statusCode === 401 && deps.keyRefused) {
        await deps
          .keyRefused(message)
          .catch((e: unknown) => log.warn({ err: e }, 'could not record the key refusal'));
      }
      if (entries.every((e) => e.state === 'unknown')) {
        for (const e of entries) deps.metrics.stripeMeterMissing.set({ event_name: e.eventName }, 1);
      }
    }
  };

  const refresh = (): Promise<void> => {
    if (running) {
      // A request during a read (a NOTIFY racing the timer) gets a read that starts after it.
      again = true;
      return running;
    }
    running = (async () => {
      do {
        again = false;
        await readOnce();
      } while (again && !stopped);
    })().finally(() => {
      running = undefined;
    });
    return running;
  };

  const schedule = () => {
    if (stopped) return;
    // Until the meters have been read once, everything is held: try again soon, not in a minute. While
    // a meter is missing, its held keys cost nothing but wait for this read: look every few seconds,
    // so they resume within seconds of the meter's return (one list call each time, nothing else).
    const seconds = entries.every((e) => e.state === 'unknown')
      ? Math.min(deps.refreshSeconds, UNKNOWN_RETRY_SECONDS)
      : entries.some((e) => e.state !== 'active')
        ? Math.min(deps.refreshSeconds, HELD_REFRESH_SECONDS)
        : deps.refreshSeconds;
    // While the listener is expected but not proven alive (its heartbeat unanswered: a no_meter
    // report's NOTIFY may go unheard), the meters are read every few seconds instead.
    const due = performance.now() + seconds * 1000;
    const tick = Math.min(seconds, UNHEARD_REFRESH_SECONDS) * 1000;
    const wait = () => {
      timer = setTimeout(() => {
        if (performance.now() >= due - 5 || unheard()) void refresh().finally(schedule);
        else wait();
      }, tick);
      timer.unref();
    };
    wait();
  };
  const unheard = () => deps.listenConnectionString !== undefined && !pooled && heartbeat?.trusted !== true;

  // LISTEN on a dedicated connection, reconnecting after a loss; the timer covers the gap.
  let client: pg.Client | undefined;
  let reconnect: NodeJS.Timeout | undefined;
  let heartbeat: ListenerHeartbeat | undefined;
  /** The listener goes through a transaction pooler: it is not listened on, the timer alone reads. */
  let pooled = false;
  const listen = async () => {
    if (stopped || !deps.listenConnectionString) return;
    const c = new pg.Client(listenerClientOptions(deps.listenConnectionString, 'meterbox-meter-catalog'));
    let retried = false;
    const retry = () => {
      if (retried) return;
      retried = true;
      if (client === c) {
        client = undefined;
        heartbeat?.stop();
        heartbeat = undefined;
      }
      destroyClient(c);
      if (!stopped) {
        reconnect = setTimeout(() => void listen(), 5_000);
        reconnect.unref();
      }
    };
    c.on('error', (err) => {
      log.warn({ err: err.message }, 'meter catalog listener lost; reconnecting');
      retry();
    });
    c.on('notification', () => {
      log.info('Stripe reported events for a missing or archived meter: reading the meters again');
      void refresh();
      deps.onReport?.();
    });
    try {
      await c.connect();
      await assertOwnSession(c);
      const listenedAt = performance.now();
      await c.query(`LISTEN ${METER_CATALOG_CHANNEL}`);
      if (stopped) {
        await c.end().catch(() => undefined);
        return;
      }
      client = c;
      heartbeat = new ListenerHeartbeat(
        c,
        deps.heartbeatMs ?? 2_000,
        (err) => {
          deps.watch?.replaced('meter-catalog-listener', 'heartbeat', err);
          retry();
        },
        listenedAt,
      );
    } catch (err) {
      if (err instanceof PooledSessionError) {
        pooled = true;
        // A pooler stays a pooler: trying again would only repeat this.
        c.removeAllListeners('error');
        c.on('error', () => undefined);
        await c.end().catch(() => undefined);
        log.warn(
          { refreshSeconds: deps.refreshSeconds, fix: POOLED_LISTEN_FIX },
          `meter catalog: its LISTEN connection goes through a transaction pooler and would hear nothing; not listening, so the meters are read again only every ${deps.refreshSeconds} s (and a no_meter report waits for that); ${POOLED_LISTEN_FIX}`,
        );
        return;
      }
      log.warn({ err: err instanceof Error ? err.message : String(err) }, 'meter catalog listener failed');
      retry();
    }
  };

  await refresh();
  schedule();
  // Not awaited: the timer covers the time until the listener is up.
  void listen();

  return {
    sendable: (eventName) => entries.find((e) => e.eventName === eventName)?.state === 'active',
    missing: () => entries.filter((e) => e.state !== 'active').map((e) => e.eventName),
    entries: () => entries.map((e) => ({ ...e })),
    meterId: (eventName) => {
      const entry = entries.find((e) => e.eventName === eventName);
      return entry?.state === 'active' && entry.meterId ? entry.meterId : undefined;
    },
    refresh,
    async releaseHeld(eventName) {
      if (entries.find((e) => e.eventName === eventName)?.state === 'active')
        await releaseHeldKeys(deps.db, deps.boss, eventName, deps.distributed, scope);
    },
    async stop() {
      stopped = true;
      clearTimeout(timer);
      clearTimeout(reconnect);
      heartbeat?.stop();
      const c = client;
      client = undefined;
      // Not end(): on a silently dead socket it would wait for the kernel to give up.
      if (c) destroyClient(c);
      await running;
    },
  };
}
