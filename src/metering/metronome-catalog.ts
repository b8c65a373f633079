// The worker's Metronome catalog ("never into a void", issue 34): which of meterbox's meters have a
// billable metric at Metronome that counts them. Metronome does not attribute usage that arrived
// before its streaming metric existed ("if usage is sent in before a streaming metric is defined, it
// isn't attributed to the metric"), so a meter without its metric is held by name, as a missing
// Stripe meter is (meter_delivery_keys.hold, destination 'metronome'), and released when a read sees
// the metric. Read at start-up and every METER_CATALOG_REFRESH_SECONDS (every 5 s while one is missing).
import type Metronome from '@metronome/sdk';
import type { Kysely } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { DB, MeterEventName } from '../db/schema.js';
import type { Logger } from '../log.js';
import type { Metrics } from '../observability/metrics.js';
import { releaseHeldKeys } from './hold-sql.js';
import type { MeterCatalog } from './meter-catalog.js';
import { listBillableMetrics, METRONOME_METRICS, metricFor } from './metronome.js';
import { queueDeliveries } from './outbox.js';

export type MetronomeCatalog = Pick<MeterCatalog, 'sendable' | 'releaseHeld' | 'missing'> & {
  /** The billable metric's id of each meter found, for the usage query (parity, reconciliation). */
  metricIds(): { eventName: MeterEventName; id: string }[];
  refresh(): Promise<void>;
  stop(): Promise<void>;
};

const FIX = 'run `meterbox metronome setup` (then `meterbox metronome check`)';
const HELD_REFRESH_SECONDS = 5;
const RELEASE_CHUNK = 1_000;

export async function startMetronomeCatalog(deps: {
  client: Metronome;
  db: Kysely<DB>;
  boss: PgBoss;
  log: Logger;
  refreshSeconds: number;
  /** Whether the database is distributed now (Database.distributed; it may become so under a running worker). */
  distributed?: () => Promise<boolean>;
  /** meterbox_metronome_metric_missing: the alert MeterboxMetronomeMetricMissing reads it. */
  metrics?: Pick<Metrics, 'metronomeMetricMissing'>;
}): Promise<MetronomeCatalog> {
  const log = deps.log.child({ component: 'metronome-catalog' });
  /** Unknown (never read) counts as missing: held until a read. */
  let found = new Map<MeterEventName, string>();
  let read = false;
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  let running: Promise<void> | undefined;

  const release = async (eventName: MeterEventName) => {
    const distributed = (await deps.distributed?.()) ?? false;
    const keys = await releaseHeldKeys(deps.db, eventName, { distributed }, 'metronome');
    for (let i = 0; i < keys.length; i += RELEASE_CHUNK) {
      await queueDeliveries(deps.boss, keys.slice(i, i + RELEASE_CHUNK));
    }
    return keys.length;
  };

  const readOnce = async () => {
    try {
      const metrics = await listBillableMetrics(deps.client);
      const next = new Map<MeterEventName, string>();
      for (const spec of METRONOME_METRICS) {
        const m = metricFor(metrics, spec);
        if (m) next.set(spec.eventName, m.id);
      }
      const before = found;
      found = next;
      read = true;
      for (const spec of METRONOME_METRICS) {
        deps.metrics?.metronomeMetricMissing.set(
          { event_name: spec.eventName },
          next.has(spec.eventName) ? 0 : 1,
        );
        if (next.has(spec.eventName)) {
          const released = await release(spec.eventName);
          if (released > 0 || !before.has(spec.eventName))
            log.info({ eventName: spec.eventName, released }, 'Metronome billable metric available');
        } else if (before.has(spec.eventName) || before.size === 0) {
          log.warn(
            { eventName: spec.eventName, fix: FIX },
            `no Metronome billable metric counts ${spec.eventName}: its usage is held pending; ${FIX}`,
          );
        }
      }
    } catch (err) {
      log.warn(
        { err: err instanceof Error ? err.message : String(err) },
        'reading Metronome billable metrics failed',
      );
    }
  };

  const refresh = () => {
    running ??= readOnce().finally(() => {
      running = undefined;
    });
    return running;
  };

  const schedule = () => {
    if (stopped) return;
    const held = !read || METRONOME_METRICS.some((s) => !found.has(s.eventName));
    const seconds = held ? Math.min(deps.refreshSeconds, HELD_REFRESH_SECONDS) : deps.refreshSeconds;
    timer = setTimeout(() => void refresh().finally(schedule), seconds * 1000);
    timer.unref();
  };

  // Until the first read, every meter counts as missing (held).
  for (const spec of METRONOME_METRICS)
    deps.metrics?.metronomeMetricMissing.set({ event_name: spec.eventName }, 1);
  await refresh();
  schedule();
  return {
    sendable: (eventName) => found.has(eventName),
    missing: () => METRONOME_METRICS.map((s) => s.eventName).filter((e) => !found.has(e)),
    metricIds: () => [...found].map(([eventName, id]) => ({ eventName, id })),
    async releaseHeld(eventName) {
      if (found.has(eventName)) await release(eventName);
    },
    refresh,
    async stop() {
      stopped = true;
      clearTimeout(timer);
      await running;
    },
  };
}
