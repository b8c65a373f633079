// Connections that die without a word (a NAT or load balancer drops the flow, a failover moves the
// address without a reset): no FIN, no RST, the packets just stop, and Linux gives up on such a socket
// only after ~15 minutes of retransmissions (never, with nothing in flight and no keepalive). Every
// connection meterbox holds is therefore bounded here: TCP keepalive finds an idle one dead, a
// client-side deadline on every statement finds a busy one, and a connection whose statement missed
// its deadline is destroyed, never handed out again. Listeners add a heartbeat (see ListenerHeartbeat).
// Why this file is long: the deadline client (timing every statement, the worker's probe, the pool's
// eviction) is most of it and shares the watch and destroyClient with the heartbeat and the server's
// bounds; the client is the part to move to a file of its own.
import { AsyncLocalStorage } from 'node:async_hooks';
import pg from 'pg';
import type { Logger } from '../log.js';
import { type DeadlineProbe, PROBE_MAX_DEADLINES } from './deadline-probe.js';
import { postgresUrl } from './postgres-url.js';
import {
  MIN_IDLE_IN_TRANSACTION_MS,
  SERVER_CLIENT_CHECK_MS,
  SERVER_KEEPALIVE,
  SERVER_USER_TIMEOUT_MS,
} from './server-bounds.js';

/** Why a connection was given up: a statement missed its deadline, or a listener's heartbeat did. */
export type ReplacedReason = 'deadline' | 'heartbeat';

export interface ConnectionWatch {
  /** Counts a connection given up in `pool` and logs the first of an outage (one line per outage). */
  replaced(pool: string, reason: ReplacedReason, err?: unknown): void;
  /** Counts a statement of `pool` kept past its deadline because the server was still running it. */
  slow(pool: string): void;
}

/** Replacements closer together than this belong to one outage (logged once). */
const OUTAGE_QUIET_MS = 60_000;

export function createConnectionWatch(
  log: Logger,
  count: (labels: { pool: string; reason: ReplacedReason }) => void,
  countSlow: (labels: { pool: string }) => void = () => undefined,
): ConnectionWatch {
  const lastReplaced = new Map<string, number>();
  return {
    slow(pool) {
      countSlow({ pool });
    },
    replaced(pool, reason, err) {
      count({ pool, reason });
      const now = performance.now();
      const last = lastReplaced.get(pool);
      lastReplaced.set(pool, now);
      if (last !== undefined && now - last < OUTAGE_QUIET_MS) return;
      log.warn(
        { pool, reason, err: err instanceof Error ? err.message : err },
        `database connection of ${pool} did not answer in time (${reason}); destroyed and replaced by a new one (further ones of this outage are counted in meterbox_db_connections_replaced_total, not logged)`,
      );
    },
  };
}

/** TCP keepalive's idle time before probing (libuv then probes every second, 10 times on Linux). */
export const KEEPALIVE_IDLE_MS = 5_000;

/** pg's message when query_timeout passes. */
const READ_TIMEOUT = 'Query read timeout';

/** What of pg-pool's internals the eviction below reads (no public interface lists idle clients). */
interface PoolInternals {
  _idle?: { client: pg.Client }[];
  _remove?: (client: pg.Client) => void;
}

/** Set while statements that may legitimately be long run (longStatements). */
const longScope = new AsyncLocalStorage<true>();

/**
 * Runs `fn` with the long deadline (DB_LONG_STATEMENT_DEADLINE_MS) on every statement it sends, on
 * whatever pool: the worker's statements whose time grows with a backlog or a table (a delivery claim
 * of a thousand keys on a slow database, a report's chunk, maintenance). Requests never run in it, so
 * a request still waits at most the short deadline on a dead connection.
 */
export function longStatements<T>(fn: () => Promise<T>): Promise<T> {
  return longScope.run(true, fn);
}

/**
 * Whether a query's first argument is a submittable (pg-cursor, Kysely's streams): the query itself,
 * timed by pg through the `query_timeout` it reads off it, not by the deadline client.
 */
const isSubmittable = (config: unknown): config is { submit: unknown } =>
  typeof config === 'object' &&
  config !== null &&
  typeof (config as { submit?: unknown }).submit === 'function';

/** A submittable with pg's per-query `query_timeout` set on it. */
function submittableWithDeadline(config: { submit: unknown }, deadlineMs: number): unknown {
  return Object.assign(config, { query_timeout: deadlineMs });
}

/** A pg.Client class built by deadlineClient; attach() tells it its pool (for the eviction). */
export type DeadlineClientClass = typeof pg.Client & {
  attach(pool: pg.Pool): void;
  /** A query's first argument with the deadline of the caller's scope written into it. */
  stamp(config: unknown): unknown;
};

/** Whether a query's first argument already names its own deadline (pg's query_timeout). */
const hasDeadline = (config: unknown) =>
  typeof config === 'object' && config !== null && 'query_timeout' in config;

/** The deadline a pool's query() wrote into a query's first argument (its caller's scope), if any. */
const SCOPED = Symbol('meterbox.deadline');
const scopedDeadline = (config: unknown): number | undefined =>
  typeof config === 'object' && config !== null ? (config as { [SCOPED]?: number })[SCOPED] : undefined;

/** A query's first argument with the deadline of its caller's scope in it (read by the client, not pg). */
function withScopedDeadline(config: unknown, deadlineMs: number): unknown {
  if (typeof config === 'string') return { text: config, [SCOPED]: deadlineMs };
  if (typeof config !== 'object' || config === null) return config;
  if (isSubmittable(config)) return submittableWithDeadline(config, deadlineMs);
  return { ...config, [SCOPED]: deadlineMs };
}

/** Whether an error came from the server (it answered), not from the connection. */
const fromServer = (err: unknown) => typeof err === 'object' && err !== null && 'severity' in err;

/**
 * A pg.Client class whose statements carry a deadline (`deadlineMs`, or `longDeadlineMs` in
 * longStatements): one that misses it rejects with code ETIMEDOUT (the database is unavailable: HTTP
 * 503) and its connection is ended and its socket destroyed at once, so pg-pool discards it on release
 * (also a release without an error, as Kysely's) and a ROLLBACK queued behind it fails at once instead
 * of waiting on the dead socket. The pool's idle connections that have not answered since that statement
 * was sent are dropped too: a network outage kills them all, and each would otherwise cost the next
 * request a whole deadline. With a `probe` (the worker's pools), a statement that misses its deadline
 * while the server is still running it is kept, a deadline at a time, up to PROBE_MAX_DEADLINES
 * (src/db/deadline-probe.ts): a slow database is not a dead connection.
 */
export function deadlineClient(
  watch: ConnectionWatch,
  pool: string,
  deadlines: { deadlineMs: number; longDeadlineMs: number; probe?: DeadlineProbe },
): DeadlineClientClass {
  const { deadlineMs, longDeadlineMs, probe } = deadlines;
  const long = () => longDeadlineMs > deadlineMs && longScope.getStore() === true;
  let owner: PoolInternals | undefined;
  class DeadlineClient extends pg.Client {
    static attach(p: pg.Pool): void {
      owner = p as unknown as PoolInternals;
    }

    static stamp(config: unknown): unknown {
      return withScopedDeadline(config, long() ? longDeadlineMs : deadlineMs);
    }

    /** performance.now() of this connection's last answer (or of its start). */
    lastAnswerAt = performance.now();
    private gaveUp = false;

    constructor(config?: string | pg.ClientConfig) {
      super(config);
      const query = this.query.bind(this) as (...args: unknown[]) => unknown;
      // A query with pg's own query_timeout (a caller's explicit bound, a cursor) is timed by pg.
      const settled = (err: unknown, sentAt: number) => {
        if (err === undefined || err === null || fromServer(err)) {
          this.lastAnswerAt = performance.now();
          return;
        }
        if (!(err instanceof Error)) return;
        // A statement sent after the connection was given up (a transaction's ROLLBACK, which then
        // replaces the deadline's error as the transaction's) fails for the same reason.
        if (this.gaveUp && !('code' in err)) Object.assign(err, { code: 'ETIMEDOUT' });
        if (err.message !== READ_TIMEOUT) return;
        Object.assign(err, { code: 'ETIMEDOUT' });
        err.message = `${READ_TIMEOUT}: the statement deadline passed; connection destroyed`;
        this.giveUp(err, sentAt);
      };
      (this as unknown as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
        const sentAt = performance.now();
        const first = args[0];
        if (isSubmittable(first)) {
          if (long() && !hasDeadline(first)) args[0] = submittableWithDeadline(first, longDeadlineMs);
          return this.timedByPg(query, args, settled, sentAt);
        }
        if (hasDeadline(first)) return this.timedByPg(query, args, settled, sentAt);
        const ms = scopedDeadline(first) ?? (long() ? longDeadlineMs : deadlineMs);
        return this.timedHere(query, args, settled, sentAt, ms);
      };
    }

    /** A query pg times (its query_timeout); `settled` gives the connection up on pg's read timeout. */
    private timedByPg(
      query: (...args: unknown[]) => unknown,
      args: unknown[],
      settled: (err: unknown, sentAt: number) => void,
      sentAt: number,
    ): unknown {
      const last = args.length - 1;
      const callback = args[last];
      if (last > 0 && typeof callback === 'function') {
        args[last] = (err: unknown, res: unknown) => {
          settled(err, sentAt);
          (callback as (err: unknown, res: unknown) => void)(err, res);
        };
        return query(...args);
      }
      const result = query(...args);
      // Registered before the caller's handlers, so the connection is gone before a caller's ROLLBACK.
      if (result instanceof Promise)
        result.then(
          () => settled(undefined, sentAt),
          (err: unknown) => settled(err, sentAt),
        );
      return result;
    }

    /**
     * A query this client times: at `ms` it asks the probe (if any) whether the server is still running
     * the statement, and keeps waiting if so, to the next deadline (the k-th falls k·`ms` after the send,
     * however long the probe took to answer); otherwise, or at the PROBE_MAX_DEADLINES-th deadline, it
     * gives the connection up and answers the caller with the deadline's error.
     */
    private timedHere(
      query: (...args: unknown[]) => unknown,
      args: unknown[],
      settled: (err: unknown, sentAt: number) => void,
      sentAt: number,
      ms: number,
    ): unknown {
      const last = args.length - 1;
      let callback: (err: unknown, res?: unknown) => void;
      let result: Promise<unknown> | undefined;
      if (last > 0 && typeof args[last] === 'function') {
        callback = args[last] as (err: unknown, res?: unknown) => void;
        args.pop();
      } else {
        result = new Promise((resolve, reject) => {
          callback = (err, res) => (err ? reject(err) : resolve(res));
        });
      }
      let done = false;
      let timer: NodeJS.Timeout | undefined;
      const finish = (err: unknown, res?: unknown) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        settled(err, sentAt);
        callback(err, res);
      };
      /** Deadlines passed so far: the k-th falls k deadlines after the send, however long a probe took. */
      let deadlines = 1;
      /** A long statement's questions before its deadline: one each short deadline (`earlyMs`). */
      const earlyMs = probe !== undefined && ms > deadlineMs ? deadlineMs : undefined;
      let early = 0;
      const expire = async () => {
        if (done) return;
        // What has arrived is read first. After the process stood still past the deadline (SIGSTOP, a
        // paused VM, an event loop held), Node runs expired timers before it reads the sockets: the
        // answer may be there, unread, and the connection alive. setImmediate runs after that read.
        await new Promise<void>((resolve) => setImmediate(resolve));
        if (done) return;
        if (earlyMs !== undefined && probe !== undefined && performance.now() - sentAt < ms) {
          early++;
          if (await this.neverArrived(probe))
            finish(Object.assign(new Error(READ_TIMEOUT), { code: 'ETIMEDOUT' }));
          else if (!done) {
            const next = Math.min(sentAt + ms, sentAt + (early + 1) * earlyMs);
            timer = setTimeout(() => void expire(), Math.max(0, next - performance.now()));
          }
          return;
        }
        if (probe !== undefined && !this.gaveUp && deadlines < PROBE_MAX_DEADLINES) {
          const pid = (this as unknown as { processID?: number }).processID;
          const running =
            typeof pid === 'number' && (await probe.running(pid, performance.now() - this.lastAnswerAt));
          if (done) return;
          if (running) {
            watch.slow(pool);
            deadlines++;
            timer = setTimeout(() => void expire(), Math.max(0, sentAt + deadlines * ms - performance.now()));
            return;
          }
        }
        const err = Object.assign(new Error(READ_TIMEOUT), { code: 'ETIMEDOUT' });
        finish(err);
      };
      timer = setTimeout(() => void expire(), earlyMs ?? ms);
      // Strings and objects alike: the scope's mark is not pg's to read.
      if (typeof args[0] === 'object' && args[0] !== null && SCOPED in args[0]) {
        const plain: { [SCOPED]?: unknown } = { ...args[0] };
        delete plain[SCOPED];
        args[0] = plain;
      }
      query(...args, (err: unknown, res: unknown) => finish(err, res));
      return result;
    }

    /**
     * Whether the server says this connection's statement never reached it: its backend idle, or gone on
     * a connection made to the probe's own server (behind a pooler the id is the pooler's: no answer).
     */
    private async neverArrived(probe: DeadlineProbe): Promise<boolean> {
      const pid = (this as unknown as { processID?: number }).processID;
      if (this.gaveUp || typeof pid !== 'number') return false;
      const state = await probe.state(pid, performance.now() - this.lastAnswerAt);
      return state === 'idle' || (state === 'absent' && probe.asks(this.host, this.port));
    }

    /** Ends this connection for good (pg-pool drops a client that is ending), and the pool's suspects. */
    private giveUp(err: unknown, sentAt: number): void {
      if (this.gaveUp) return;
      this.gaveUp = true;
      watch.replaced(pool, 'deadline', err);
      destroyClient(this);
      for (const { client } of [...(owner?._idle ?? [])]) {
        if (client instanceof DeadlineClient && client.lastAnswerAt < sentAt && !client.gaveUp) {
          client.gaveUp = true;
          owner?._remove?.(client);
          destroyClient(client);
        }
      }
    }
  }
  return DeadlineClient;
}

export interface ConnectionSafety {
  /** Client-side deadline of every statement (ms); 0: none (a CLI's long, attended commands). */
  deadlineMs: number;
  /** The deadline of statements run in longStatements (ms); never shorter than `deadlineMs`. */
  longDeadlineMs?: number;
  watch: ConnectionWatch;
  /** The pool's name in the metric and the log. */
  pool: string;
  /**
   * Asked before a statement past its deadline is given up (src/db/deadline-probe.ts): the worker's
   * pools, whose statements wait on a slow database; never a request's, which keeps its short bound.
   */
  probe?: DeadlineProbe;
}

/** Pool options (pg.Pool and pg-boss's pool alike) that bound every wait on a silently dead connection. */
export function safePoolOptions(
  safety: ConnectionSafety,
): Pick<pg.PoolConfig, 'keepAlive' | 'keepAliveInitialDelayMillis' | 'query_timeout' | 'Client'> {
  return {
    keepAlive: true,
    keepAliveInitialDelayMillis: KEEPALIVE_IDLE_MS,
    ...(safety.deadlineMs > 0
      ? {
          // The client times every statement itself (pg's own query_timeout only for a caller's own).
          Client: deadlineClient(safety.watch, safety.pool, {
            deadlineMs: safety.deadlineMs,
            longDeadlineMs: Math.max(safety.deadlineMs, safety.longDeadlineMs ?? 0),
            ...(safety.probe ? { probe: safety.probe } : {}),
          }),
        }
      : {}),
  };
}

/**
 * Proves a LISTEN connection alive: `SELECT 1` every `intervalMs`, each answered within `intervalMs`.
 * A NOTIFY committed before a heartbeat was sent reaches the listener before its answer (one ordered
 * stream), so `provenSince()` (when the last answered heartbeat was sent) bounds what the listener may
 * have missed. A heartbeat without an answer in time calls `dead` (the owner destroys the connection).
 */
export class ListenerHeartbeat {
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  /** performance.now() when the last answered heartbeat (or the LISTEN itself) was sent. */
  private proven: number;

  constructor(
    private readonly client: pg.Client,
    private readonly intervalMs: number,
    private readonly dead: (err: Error) => void,
    listenedAt: number,
  ) {
    this.proven = listenedAt;
    this.schedule();
  }

  /** True when the listener answered within the bound: one interval to the next beat, one for its answer. */
  get trusted(): boolean {
    return !this.stopped && performance.now() - this.proven < 2 * this.intervalMs + HEARTBEAT_SLACK_MS;
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => void this.beat(), this.intervalMs);
    this.timer.unref();
  }

  private async beat(): Promise<void> {
    const sent = performance.now();
    let deadline: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        this.client.query('SELECT 1'),
        new Promise((_, reject) => {
          deadline = setTimeout(
            () => reject(new Error(`listener heartbeat not answered within ${this.intervalMs} ms`)),
            this.intervalMs,
          );
        }),
      ]);
      this.proven = Math.max(this.proven, sent);
      this.schedule();
    } catch (err) {
      if (this.stopped) return;
      this.stop();
      this.dead(err instanceof Error ? err : new Error(String(err)));
    } finally {
      clearTimeout(deadline);
    }
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }
}

/**
 * Tells the deadline client class of `options` (if any) the pool it serves, and makes the pool's own
 * query() take the deadline of its caller's scope: pg-pool may run the statement from the callback of
 * another caller's release (pg-boss queries this way), whose scope is not this caller's.
 */
export function attachPool(options: { Client?: unknown }, pool: pg.Pool): void {
  const client = options.Client as Partial<DeadlineClientClass> | undefined;
  client?.attach?.(pool);
  const stamp = client?.stamp;
  if (stamp === undefined) return;
  const query = pool.query.bind(pool) as (...args: unknown[]) => unknown;
  (pool as unknown as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
    if (!hasDeadline(args[0])) args[0] = stamp(args[0]);
    return query(...args);
  };
}

/** Timers and the event loop are not exact: a heartbeat answered on time is not distrusted for a few ms. */
const HEARTBEAT_SLACK_MS = 250;

/** Options of a listener's own pg.Client: keepalive from its first byte. */
export function listenerClientOptions(connectionString: string, applicationName: string): pg.ClientConfig {
  return {
    connectionString,
    application_name: applicationName,
    keepAlive: true,
    keepAliveInitialDelayMillis: KEEPALIVE_IDLE_MS,
    connectionTimeoutMillis: 5_000,
  };
}

/** Ends a listener's connection without waiting on its socket (it may be dead). */
export function destroyClient(client: pg.Client): void {
  client.end().catch(() => undefined);
  (client as unknown as { connection?: { stream?: { destroy(): void } } }).connection?.stream?.destroy();
}

/**
 * `connectionString` with what Postgres needs to find a dead client on its own side, asked for at the
 * connection's start-up (the `options` parameter, so no statement and no round trip): TCP keepalive
 * (5 s idle, then 5 probes 1 s apart), `tcp_user_timeout`, `client_connection_check_interval` (a
 * statement whose client is gone stops within a second; PostgreSQL 14 and later), and
 * `idle_in_transaction_session_timeout` of `idleInTransactionMs`. The client's deadline replaces the connection on meterbox's side, but the
 * server's backend would otherwise wait for the dead client's next statement for hours (Linux's
 * default keepalive) while its transaction holds its row locks: an ingestion transaction cut between
 * its statements kept the delivery job rows it locked, pg-boss's fetch (SKIP LOCKED) skipped them and
 * the sweep's insert waited on them, so the worker delivered nothing for that customer until the
 * kernel gave up. A middlebox that keeps the server's side alive (a proxy, a pooler) is covered by the
 * idle-in-transaction bound. The URL's own `options` are kept (ours follow, so the URL's do not win).
 * A string that is not a postgres URL is returned as it is.
 */
export function withServerBounds(connectionString: string, idleInTransactionMs: number): string {
  const url = postgresUrl(connectionString);
  if (!url) return connectionString;
  const settings = [
    `tcp_keepalives_idle=${SERVER_KEEPALIVE.idle}`,
    `tcp_keepalives_interval=${SERVER_KEEPALIVE.interval}`,
    `tcp_keepalives_count=${SERVER_KEEPALIVE.count}`,
    `tcp_user_timeout=${SERVER_USER_TIMEOUT_MS}`,
    `client_connection_check_interval=${SERVER_CLIENT_CHECK_MS}`,
    ...(idleInTransactionMs > 0
      ? [`idle_in_transaction_session_timeout=${Math.max(MIN_IDLE_IN_TRANSACTION_MS, idleInTransactionMs)}`]
      : []),
  ];
  const own = url.searchParams.get('options');
  const options = [own, ...settings.map((s) => `-c ${s}`)].filter(Boolean).join(' ');
  if (own === null) {
    // Appended as text: the rest of the string (an encoded password, say) stays byte for byte.
    const sep = connectionString.includes('?') ? '&' : '?';
    const [base, fragment] = connectionString.split('#', 2) as [string, string | undefined];
    return `${base}${sep}options=${encodeURIComponent(options)}${fragment === undefined ? '' : `#${fragment}`}`;
  }
  url.searchParams.set('options', options);
  return url.toString();
}

/** withServerBounds as the settings ask (DB_SERVER_TIMEOUTS, the idle bound DB_STATEMENT_DEADLINE_MS). */
export function serverBoundedUrl(
  connectionString: string,
  settings: { DB_SERVER_TIMEOUTS: 'on' | 'off'; DB_STATEMENT_DEADLINE_MS: number },
): string {
  return settings.DB_SERVER_TIMEOUTS === 'on'
    ? withServerBounds(connectionString, settings.DB_STATEMENT_DEADLINE_MS)
    : connectionString;
}
