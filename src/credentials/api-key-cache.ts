// Verified API keys cached in the API process, so a request costs no key lookup. Correctness rests
// on invalidation, not on expiry: migration 0010 notifies `meterbox_api_keys` with the key's hash
// whenever a key is revoked or deleted, and a dedicated connection LISTENs for it. While that
// connection is not listening (not yet connected, lost, reconnecting) the cache is bypassed and
// emptied, so a lost notification can never leave a revoked key usable. A LISTEN through a
// transaction pooler (PgBouncer) would "succeed" on a borrowed server connection and never hear a
// NOTIFY: the listener checks it has a session of its own and otherwise stays down (keys looked up).
// Once listening, the cache is warmed with the most recently used keys (one query), so a restarted
// API process does not send a lookup for each of thousands of keys; and the keys' last_used_at
// writes are gathered here and written in one statement every few seconds.
// A listener whose connection died silently (no FIN, no RST) would stay "connected" for ever and
// never hear a revocation: it is trusted only while its heartbeat (SELECT 1 every few seconds) was
// answered within the bound; otherwise keys are looked up, and a missed heartbeat replaces it.
// While it is down, reconnecting follows its backoff (one attempt per step, whatever the request
// rate: requests meanwhile look their keys up), and an outage is logged once, not per attempt.
import pg from 'pg';
import {
  type ConnectionWatch,
  destroyClient,
  ListenerHeartbeat,
  listenerClientOptions,
} from '../db/dead-connections.js';
import { assertOwnSession } from '../db/session.js';
import type { Logger } from '../log.js';

export const API_KEY_CHANNEL = 'meterbox_api_keys';

export interface CachedKey {
  organizationId: string;
  keyId: string;
  /** When last_used_at was last written for this key (ms), to write it at most once a minute. */
  touchedAt: number;
}

export interface WarmKey {
  hash: string;
  organizationId: string;
  keyId: string;
  lastUsedAt: Date | null;
}

export interface ApiKeyCacheOptions {
  connectionString: string;
  log: Logger;
  /** The `limit` most recently used live keys (recentApiKeys); read once the listener is up. */
  warm?: (limit: number) => Promise<WarmKey[]>;
  /** Writes last_used_at of many keys at once (recordApiKeysUsed). */
  recordUsed?: (used: { keyId: string; at: Date }[]) => Promise<void>;
  /** First delay before reconnecting a lost or refused listener (doubles up to 30 s); default 500 ms. */
  reconnectMs?: number;
  /** Heartbeat interval of the listener (ms); entries are served only within twice this of an answer. */
  heartbeatMs?: number;
  /** Counts a listener replaced for a missed heartbeat. */
  watch?: ConnectionWatch;
  /**
   * Most keys kept (API_KEY_CACHE_MAX_KEYS), the least recently used going first, and how many the warm
   * read takes; 0 keeps none (every request looks its key up). Default DEFAULT_MAX_KEYS.
   */
  maxKeys?: number;
}

const HEARTBEAT_MS = 2_000;

/**
 * Most keys kept unless told: 100,000, the organizations the hourly report is measured at. A key costs
 * about 300 bytes of heap (a 64-character hash, two ids and a number), so 30 MB at the full count; a
 * process whose requests come from more live keys than it keeps looks the others up, one indexed read
 * each (meterbox_api_key_lookups_total{source="database"}).
 */
export const DEFAULT_MAX_KEYS = 100_000;
const RECONNECT_MS = 500;
/** How often gathered last_used_at writes go to the database (one statement for all keys). */
const RECORD_USED_EVERY_MS = 2_000;
const MAX_RECONNECT_MS = 30_000;

export class ApiKeyCache {
  private readonly entries = new Map<string, CachedKey>();
  private client: pg.Client | undefined;
  private listening = false;
  private heartbeat: ListenerHeartbeat | undefined;
  private starting: Promise<void> | undefined;
  private closed = false;
  private retryMs: number;
  private readonly maxKeys: number;
  /** The next reconnect attempt, while one is scheduled: until it fires nothing else connects. */
  private timer: NodeJS.Timeout | undefined;
  /** An outage was logged and the listener has not been up since: further failures stay quiet. */
  private down = false;
  /** Bumped by every invalidation: a lookup that raced one is not cached. */
  private generation = 0;
  /** last_used_at writes not yet recorded: key id -> the latest use. */
  private used = new Map<string, Date>();
  private usedTimer: NodeJS.Timeout | undefined;
  private recording: Promise<void> | undefined;
  /** Settles when the first listener attempt has: its warm read done or failed, or its connection refused. */
  private readonly firstAttempt: Promise<void>;
  private firstAttemptSettled: () => void = () => {};

  constructor(private readonly options: ApiKeyCacheOptions) {
    this.retryMs = options.reconnectMs ?? RECONNECT_MS;
    this.maxKeys = options.maxKeys ?? DEFAULT_MAX_KEYS;
    this.firstAttempt = new Promise((resolve) => {
      this.firstAttemptSettled = resolve;
    });
  }

  /**
   * Resolves once the listener's first attempt has settled (its warm read done or failed, or its
   * connection refused: keys are then looked up) or after `boundMs`, whichever is first; never rejects.
   * The API listens after it (src/bin/server.ts): a process that took requests while it parsed up to
   * API_KEY_CACHE_MAX_KEYS keys shared its one thread between them (at 100,000 keys, half a second of a
   * core: the first second of the load's p99 380-560 ms in the report bench, docs/benchmarks.md).
   */
  async warmed(boundMs: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const bound = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, boundMs);
      timer.unref();
    });
    await Promise.race([this.firstAttempt, bound]);
    clearTimeout(timer);
  }

  /**
   * True while the listener is connected and has proven itself recently (a heartbeat answered within
   * the bound): only then are entries served.
   */
  get active(): boolean {
    return this.listening && !this.closed && this.heartbeat?.trusted === true;
  }

  get size(): number {
    return this.entries.size;
  }

  /**
   * The cached key, or undefined (also whenever the listener is down). Starts the listener lazily;
   * while a reconnect is scheduled, a request leaves it to its timer (start() does nothing then).
   */
  get(hash: string): CachedKey | undefined {
    if (!this.active) {
      this.start();
      return undefined;
    }
    const entry = this.entries.get(hash);
    if (entry) {
      // Least recently used first: re-insert on every hit.
      this.entries.delete(hash);
      this.entries.set(hash, entry);
    }
    return entry;
  }

  /** A token to take before a database lookup and hand to set(): set() ignores a raced lookup. */
  ticket(): number {
    return this.generation;
  }

  set(hash: string, entry: CachedKey, ticket: number): void {
    if (!this.active || ticket !== this.generation || this.maxKeys === 0) return;
    this.entries.set(hash, entry);
    if (this.entries.size > this.maxKeys) {
      const oldest = this.entries.keys().next().value;
      if (oldest !== undefined) this.entries.delete(oldest);
    }
  }

  /**
   * Notes that a key was used at `at`; written with the other keys' uses within a few seconds (the
   * caller decides how often a key is worth noting: at most once a minute, see auth.ts).
   */
  touch(keyId: string, at: Date): void {
    if (!this.options.recordUsed || this.closed) return;
    this.used.set(keyId, at);
    if (!this.usedTimer) {
      this.usedTimer = setTimeout(() => {
        this.usedTimer = undefined;
        void this.recordUsed();
      }, RECORD_USED_EVERY_MS);
      this.usedTimer.unref();
    }
  }

  /** Writes the noted uses now (tests, shutdown). Never throws: a failed write is logged. */
  async recordUsed(): Promise<void> {
    await this.recording;
    const record = this.options.recordUsed;
    if (!record || this.used.size === 0) return;
    const batch = [...this.used].map(([keyId, at]) => ({ keyId, at }));
    this.used = new Map();
    this.recording = record(batch)
      .catch((err: unknown) => this.options.log.warn({ err }, 'could not record last_used_at of API keys'))
      .finally(() => {
        this.recording = undefined;
      });
    await this.recording;
  }

  /** Fills the cache with the most recently used keys, unless an invalidation raced the read. */
  private async warm(): Promise<void> {
    const read = this.options.warm;
    if (!read || this.maxKeys === 0) return;
    const ticket = this.generation;
    try {
      const keys = await read(this.maxKeys);
      // Oldest first, so the most recently used end up last in the LRU order.
      for (const k of keys.reverse()) {
        if (this.entries.has(k.hash)) continue;
        this.set(
          k.hash,
          { organizationId: k.organizationId, keyId: k.keyId, touchedAt: k.lastUsedAt?.getTime() ?? 0 },
          ticket,
        );
      }
    } catch (err) {
      this.options.log.warn({ err }, 'API key cache: warming failed; keys are looked up on first use');
    }
  }

  private invalidate(hash?: string): void {
    this.generation++;
    if (hash === undefined) this.entries.clear();
    else this.entries.delete(hash);
  }

  /**
   * Connects the listener if it is not and no reconnect is scheduled (idempotent, never throws). It
   * used to connect whenever a request found the listener down, past the backoff: behind a pooler,
   * one refused connection and one warning per request.
   */
  start(): void {
    if (this.closed || this.listening || this.starting || this.timer) return;
    this.starting = this.connect()
      .catch((err: unknown) => {
        this.outage(err, 'API key cache: listener connection failed; keys are looked up until it is up');
        this.scheduleReconnect();
        this.firstAttemptSettled();
      })
      .finally(() => {
        this.starting = undefined;
      });
  }

  /** Logs the first failure of an outage as a warning, and the rest of it at debug. */
  private outage(err: unknown, message: string): void {
    if (this.down) {
      this.options.log.debug({ err, retryMs: this.retryMs }, message);
      return;
    }
    this.down = true;
    this.options.log.warn({ err }, message);
  }

  private async connect(): Promise<void> {
    const client = new pg.Client(listenerClientOptions(this.options.connectionString, 'meterbox-api-keys'));
    const lost = (err?: unknown) => {
      if (this.client !== client) return;
      this.client = undefined;
      this.listening = false;
      this.heartbeat?.stop();
      this.heartbeat = undefined;
      this.invalidate();
      destroyClient(client);
      if (!this.closed) {
        this.outage(err, 'API key cache: listener lost; keys are looked up until it is back');
        this.scheduleReconnect();
      }
    };
    client.on('error', lost);
    client.on('end', () => lost());
    client.on('notification', (message) => {
      if (message.channel === API_KEY_CHANNEL) this.invalidate(message.payload || undefined);
    });
    this.client = client;
    let listenedAt = 0;
    try {
      await client.connect();
      await assertOwnSession(client);
      listenedAt = performance.now();
      await client.query(`LISTEN ${API_KEY_CHANNEL}`);
    } catch (err) {
      if (this.client === client) this.client = undefined;
      await client.end().catch(() => {});
      throw err;
    }
    if (this.closed || this.client !== client) {
      await client.end().catch(() => {});
      return;
    }
    // Anything cached before (there is nothing: entries are only kept while listening) is dropped.
    this.invalidate();
    this.listening = true;
    const heartbeatMs = this.options.heartbeatMs ?? HEARTBEAT_MS;
    this.heartbeat = new ListenerHeartbeat(
      client,
      heartbeatMs,
      (err) => {
        // The watch logs the outage once; the cache's own line would be a second one for it.
        this.options.watch?.replaced('api-keys-listener', 'heartbeat', err);
        if (this.options.watch) this.down = true;
        lost(err);
      },
      listenedAt,
    );
    this.retryMs = this.options.reconnectMs ?? RECONNECT_MS;
    if (this.down) {
      this.down = false;
      this.options.log.info('API key cache: listener back; verified keys are cached again');
    }
    // After LISTEN: a key revoked after this read is invalidated by its NOTIFY, one revoked before
    // is not read (set() drops the whole read if a NOTIFY arrived meanwhile).
    void this.warm().finally(() => this.firstAttemptSettled());
  }

  private scheduleReconnect(): void {
    if (this.closed || this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.start();
    }, this.retryMs);
    this.timer.unref();
    this.retryMs = Math.min(this.retryMs * 2, MAX_RECONNECT_MS);
  }

  async close(): Promise<void> {
    this.firstAttemptSettled();
    if (this.usedTimer) clearTimeout(this.usedTimer);
    this.usedTimer = undefined;
    await this.recordUsed();
    this.closed = true;
    this.listening = false;
    this.heartbeat?.stop();
    this.invalidate();
    if (this.timer) clearTimeout(this.timer);
    const client = this.client;
    this.client = undefined;
    await this.starting;
    // Not end(): on a silently dead socket it would wait for the kernel to give up.
    if (client) destroyClient(client);
  }
}
