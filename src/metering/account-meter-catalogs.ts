// Stripe Connect: the worker's meter catalog of each connected account it delivers to. Meters are an
// account's own at Stripe, so a connected account without `temperature_readings` gets its events
// accepted and dropped later (`no_meter`), whatever the platform has. Each account's meters are read
// with `Stripe-Account` on its first batch, again every METER_CATALOG_REFRESH_SECONDS (every 5 s while
// one is missing), each read taking a slot of that account's own budget row (at Stripe it counts
// against the account's limit, not the platform's). A key whose meter is missing on its account is
// held by name like the platform's (meter_delivery_keys.hold), and a read that finds the meter frees
// that account's held keys only. At most CONNECT_METER_CATALOG_MAX_ACCOUNTS accounts are kept; beyond
// that the least recently used one whose meters are all there is forgotten (read again when used). A
// no_meter/archived_meter report (the platform catalog's NOTIFY) has every kept account read again.
import type { Kysely } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type Stripe from 'stripe';
import { listAccountMeters } from '../billing/stripe-account.js';
import type { DB, MeterEventName } from '../db/schema.js';
import type { Logger } from '../log.js';
import type { Metrics } from '../observability/metrics.js';
import type { AccountCallers } from './budget.js';
import { releaseHeldKeys } from './hold-sql.js';
import { type CatalogEntry, catalogEntries, type MeterCatalog } from './meter-catalog.js';
import { queueDeliveries } from './outbox.js';

export type AccountCatalog = Pick<MeterCatalog, 'sendable' | 'releaseHeld'>;

export interface AccountMeterCatalogs {
  /** The account's catalog, its meters read first when the account is new (or was forgotten). */
  of(account: string): Promise<AccountCatalog>;
  /**
   * Every kept account's meters read again soon (one at a time, each on its own budget row): a
   * no_meter/archived_meter error report was recorded (its NOTIFY names no account).
   */
  refreshAll(): void;
  /** Event names held now per account (missing, unfit, or never read). */
  missing(): { account: string; eventName: MeterEventName }[];
  stop(): Promise<void>;
}

const FIX = 'run `meterbox stripe setup --account <acct>` (then `meterbox stripe check`)';
/** Read interval while a meter is missing or the account has not been read yet. */
const HELD_REFRESH_SECONDS = 5;
const TICK_MS = 1_000;
const RELEASE_CHUNK = 1_000;

interface AccountState {
  /** undefined: never read (every event name held), unless the read was an access refusal. */
  entries: CatalogEntry[] | undefined;
  /** The read was refused for access (deauthorized): delivery's access hold takes the account over. */
  accessRefused: boolean;
  nextReadAt: number;
  lastUsed: number;
  first: Promise<void>;
}

/** A 401/403 or `account_invalid`: the account refuses the platform (connect access hold's rule). */
function accessRefusal(err: unknown): boolean {
  const e = err as { statusCode?: number; code?: string };
  return e?.statusCode === 401 || e?.statusCode === 403 || e?.code === 'account_invalid';
}

export function createAccountMeterCatalogs(deps: {
  stripe: Stripe;
  db: Kysely<DB>;
  boss: PgBoss;
  log: Logger;
  metrics?: Pick<Metrics, 'connectAccountMeterMissing'>;
  refreshSeconds: number;
  maxAccounts: number;
  /** Each account's own budget row (createAccountCallers): its meter lists take its slots. */
  callers: AccountCallers;
  distributed?: () => Promise<boolean>;
  now?: () => number;
}): AccountMeterCatalogs {
  const log = deps.log.child({ component: 'account-meter-catalog' });
  const now = deps.now ?? (() => performance.now());
  const accounts = new Map<string, AccountState>();
  let stopped = false;
  let ticking: Promise<void> | undefined;

  const release = async (account: string, eventName: MeterEventName) => {
    const distributed = (await deps.distributed?.()) ?? false;
    const keys = await releaseHeldKeys(deps.db, eventName, { distributed }, 'stripe', { account });
    for (let i = 0; i < keys.length; i += RELEASE_CHUNK) {
      await queueDeliveries(deps.boss, keys.slice(i, i + RELEASE_CHUNK));
    }
    return keys.length;
  };

  const read = async (account: string, state: AccountState) => {
    try {
      const { caller } = await deps.callers.of(account);
      const meters = await caller.call(() => listAccountMeters(deps.stripe, account));
      const next = catalogEntries(meters);
      const before = state.entries;
      state.entries = next;
      state.accessRefused = false;
      for (const entry of next) {
        const prior = before?.find((e) => e.eventName === entry.eventName);
        deps.metrics?.connectAccountMeterMissing.set(
          { account, event_name: entry.eventName },
          entry.state === 'active' ? 0 : 1,
        );
        if (entry.state !== 'active') {
          if (prior?.state !== entry.state || prior.detail !== entry.detail) {
            log.warn(
              { account, eventName: entry.eventName, state: entry.state, meterId: entry.meterId, fix: FIX },
              `Stripe meter for ${entry.eventName} unusable on connected account ${account} (${entry.detail}): its usage there is held pending; ${FIX}`,
            );
          }
        } else {
          // Every read, as the platform's catalog: keys held by a batch that raced the change are freed too.
          const released = await release(account, entry.eventName);
          if (prior && prior.state !== 'active') {
            log.info(
              { account, eventName: entry.eventName, meterId: entry.meterId, released },
              'Stripe meter available on connected account: delivery there resumes',
            );
          }
        }
      }
    } catch (err) {
      // Keep what was known. Never read and refused for access: the account's calls meet the same
      // refusal, and delivery's access hold (pending, uncounted, probed) is the one that handles it.
      if (state.entries === undefined && accessRefusal(err)) state.accessRefused = true;
      log.warn(
        { account, err: err instanceof Error ? err.message : String(err) },
        'reading a connected account’s Stripe meters failed',
      );
    } finally {
      const held = state.entries === undefined || state.entries.some((e) => e.state !== 'active');
      state.nextReadAt =
        now() + (held ? Math.min(deps.refreshSeconds, HELD_REFRESH_SECONDS) : deps.refreshSeconds) * 1000;
    }
  };

  /** Beyond the bound: forget the least recently used accounts whose meters are all there. */
  const evict = () => {
    if (accounts.size <= deps.maxAccounts) return;
    const idle = [...accounts]
      .filter(([, s]) => s.entries?.every((e) => e.state === 'active') === true)
      .sort(([, a], [, b]) => a.lastUsed - b.lastUsed);
    for (const [account] of idle.slice(0, accounts.size - deps.maxAccounts)) {
      accounts.delete(account);
      for (const e of ['temperature_readings', 'active_sensors'] as const)
        deps.metrics?.connectAccountMeterMissing.remove({ account, event_name: e });
    }
  };

  const ensure = (account: string): AccountState => {
    let state = accounts.get(account);
    if (!state) {
      const created: AccountState = {
        entries: undefined,
        accessRefused: false,
        nextReadAt: Number.POSITIVE_INFINITY,
        lastUsed: now(),
        first: Promise.resolve(),
      };
      created.first = read(account, created);
      accounts.set(account, created);
      evict();
      state = created;
    }
    state.lastUsed = now();
    return state;
  };

  const tick = async () => {
    for (const [account, state] of [...accounts]) {
      if (stopped) return;
      if (state.nextReadAt <= now()) {
        state.nextReadAt = Number.POSITIVE_INFINITY;
        await read(account, state);
      }
    }
  };
  const timer = setInterval(() => {
    if (ticking || stopped) return;
    ticking = tick().finally(() => {
      ticking = undefined;
    });
  }, TICK_MS);
  timer.unref();

  const sendable = (account: string, eventName: MeterEventName): boolean => {
    const state = accounts.get(account);
    if (!state) {
      // Forgotten (the bound): held now, read again; the read frees the key if its meter is there.
      ensure(account);
      return false;
    }
    state.lastUsed = now();
    if (state.entries === undefined) return state.accessRefused;
    return state.entries.find((e) => e.eventName === eventName)?.state === 'active';
  };

  return {
    async of(account) {
      await ensure(account).first;
      return {
        sendable: (eventName) => sendable(account, eventName),
        async releaseHeld(eventName) {
          if (accounts.get(account)?.entries?.find((e) => e.eventName === eventName)?.state === 'active')
            await release(account, eventName);
        },
      };
    },
    refreshAll() {
      for (const state of accounts.values()) {
        if (Number.isFinite(state.nextReadAt)) state.nextReadAt = 0;
      }
    },
    missing() {
      const out: { account: string; eventName: MeterEventName }[] = [];
      for (const [account, state] of accounts) {
        if (state.accessRefused) continue;
        for (const e of ['temperature_readings', 'active_sensors'] as const) {
          if (state.entries?.find((x) => x.eventName === e)?.state !== 'active')
            out.push({ account, eventName: e });
        }
      }
      return out;
    },
    async stop() {
      stopped = true;
      clearInterval(timer);
      await ticking;
      await Promise.all([...accounts.values()].map((s) => s.first));
    },
  };
}
