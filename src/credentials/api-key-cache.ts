// Verified API keys cached in the API process, so a request costs no key lookup. Correctness rests
// on invalidation, not on expiry: migration 0010 notifies `meterbox_api_keys` with the key's hash
// whenever a key is revoked or deleted, and a dedicated connection LISTENs for it. While that
// connection is not listening (not yet connected, lost, reconnecting) the cache is bypassed and
// emptied, so a lost notification can never leave a revoked key usable. A LISTEN through a
// transaction pooler (PgBouncer) would "succeed" on a borrowed server connection and never hear a
// NOTIFY: the listener checks it has a session of its own and otherwise stays down (keys looked up).
import pg from 'pg';
import type { Logger } from '../log.js';

export const API_KEY_CHANNEL = 'meterbox_api_keys';

export interface CachedKey {
  organizationId: string;
  keyId: string;
  /** When last_used_at was last written for this key (ms), to write it at most once a minute. */
  touchedAt: number;
}

export interface ApiKeyCacheOptions {
  connectionString: string;
  log: Logger;
}

/** Most keys kept; the least recently used go first. */
const MAX_ENTRIES = 10_000;
/** First delay before reconnecting a lost listener (doubles up to 30 s). */
const RECONNECT_MS = 500;

export class ApiKeyCache {
  private readonly entries = new Map<string, CachedKey>();
  private client: pg.Client | undefined;
  private listening = false;
  private starting: Promise<void> | undefined;
  private closed = false;
  private retryMs = RECONNECT_MS;
  private timer: NodeJS.Timeout | undefined;
  /** Bumped by every invalidation: a lookup that raced one is not cached. */
  private generation = 0;

  constructor(private readonly options: ApiKeyCacheOptions) {}

  /** True while the listener is connected: only then are entries served. */
  get active(): boolean {
    return this.listening && !this.closed;
  }

  get size(): number {
    return this.entries.size;
  }

  /** The cached key, or undefined (also whenever the listener is down). Starts the listener lazily. */
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
    if (!this.active || ticket !== this.generation) return;
    this.entries.set(hash, entry);
    if (this.entries.size > MAX_ENTRIES) {
      const oldest = this.entries.keys().next().value;
      if (oldest !== undefined) this.entries.delete(oldest);
    }
  }

  private invalidate(hash?: string): void {
    this.generation++;
    if (hash === undefined) this.entries.clear();
    else this.entries.delete(hash);
  }

  /** Connects the listener if it is not (idempotent, never throws). */
  start(): void {
    if (this.closed || this.listening || this.starting) return;
    this.starting = this.connect()
      .catch((err: unknown) => {
        this.options.log.warn({ err }, 'API key cache: listener connection failed; keys are looked up');
        this.scheduleReconnect();
      })
      .finally(() => {
        this.starting = undefined;
      });
  }

  private async connect(): Promise<void> {
    const client = new pg.Client({
      connectionString: this.options.connectionString,
      application_name: 'meterbox-api-keys',
    });
    const lost = (err?: unknown) => {
      if (this.client !== client) return;
      this.client = undefined;
      this.listening = false;
      this.invalidate();
      client.end().catch(() => {});
      if (!this.closed) {
        this.options.log.warn({ err }, 'API key cache: listener lost; keys are looked up until it is back');
        this.scheduleReconnect();
      }
    };
    client.on('error', lost);
    client.on('end', () => lost());
    client.on('notification', (message) => {
      if (message.channel === API_KEY_CHANNEL) this.invalidate(message.payload || undefined);
    });
    this.client = client;
    try {
      await client.connect();
      await assertOwnSession(client);
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
    this.retryMs = RECONNECT_MS;
  }

  private scheduleReconnect(): void {
    if (this.closed || this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.start();
    }, this.retryMs);
    this.timer.unref();
    this.retryMs = Math.min(this.retryMs * 2, 30_000);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.listening = false;
    this.invalidate();
    if (this.timer) clearTimeout(this.timer);
    const client = this.client;
    this.client = undefined;
    await this.starting;
    await client?.end().catch(() => {});
  }
}

/**
 * A session of its own answers pg_backend_pid() with the process id its server announced at
 * start-up (BackendKeyData). PgBouncer announces a made-up one and lends a server connection per
 * transaction, so the two differ there: LISTEN would be lost with the borrowed connection.
 */
async function assertOwnSession(client: pg.Client): Promise<void> {
  const announced = (client as unknown as { processID: number | null }).processID;
  const { rows } = await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
  if (rows[0]?.pid !== announced) {
    throw new Error(
      'the listener connection is not a session of its own (a transaction pooler such as PgBouncer?): ' +
        'set DATABASE_DIRECT_URL to a direct Postgres connection',
    );
  }
}
