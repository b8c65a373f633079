// The simulation's model of what delivery keeps in Postgres and pg-boss: outbox rows, the key table
// and the delivery jobs. The statements of src/metering/*-sql.ts, corrections.ts, sweep.ts and
// redrive.ts are modelled here from the same rules (src/metering/rules/) they implement, each
// applied atomically at one instant, as one statement is; test/metering/store-agreement.test.ts
// runs the same operations against both and holds them equal.
//
// Why this file is long: one model (ModelDb) of Postgres and pg-boss whose statements share its state, as
// delivery's statements share the tables.
import type { Destination, MeterEventName } from '../../src/db/schema.js';
import { EXPIRY_SAFETY_MARGIN_MS, FUTURE_ALLOWANCE_SECONDS } from '../../src/metering/claim-statement-sql.js';
import { METRONOME_PAST_WINDOW_MS } from '../../src/metering/metronome.js';
import {
  compareIds,
  groupValue,
  hourOf,
  type KeyRow,
  leaseDecision,
  nextGroupRows,
  renewableGroup,
} from '../../src/metering/rules/claim.js';
import { correctionAction } from '../../src/metering/rules/corrections.js';
import type { GroupSettlement, KeySettlement } from '../../src/metering/rules/decision.js';
import {
  type ClaimedGroup,
  type ClaimedKey,
  type CorrectionFacts,
  destinationOf,
  type KeyRef,
  keyName,
  keyRef,
  leaseGrantedTo,
  revokedLeaseOwner,
  singletonKeyOf,
} from '../../src/metering/rules/keys.js';
import { redriveVerdict } from '../../src/metering/rules/reconcile.js';
import { STRIPE_PAST_WINDOW_MS } from '../../src/metering/stripe-meter.js';
import type { Mutation } from './mutations.js';

export interface Row {
  id: string;
  destination: Destination;
  organizationId: string;
  customerId: string;
  eventName: MeterEventName;
  kind: 'usage' | 'correction';
  /** Usage: readings billed; correction: readings taken back (positive). */
  value: bigint;
  occurredAt: number;
  createdAt: number;
  status: 'pending' | 'delivered' | 'failed' | 'expired';
  identifier: string | null;
  identifiedAt: number | null;
  attempts: number;
  acceptedAt: number | null;
  deliveredAt: number | null;
  lastError: string | null;
  correctsId: string | null;
  correctionAction: 'cancel' | 'compensate' | null;
  creditNote: boolean;
  /**
   * Drawn at the row's insert and never again: ids come from a sequence, which an asynchronous
   * failover can set back (a lost row's id is given to another), so identifiers derive from this.
   */
  nonce: string;
  /** Reconciled redrives that gave the row a new identifier (part of what the identifier derives from). */
  reissues: number;
}

export interface Job {
  id: string;
  key: KeyRef;
  name: string;
  state: 'created' | 'retry' | 'active' | 'completed' | 'failed' | 'deadletter';
  startAfter: number;
  retryCount: number;
  seq: number;
  priority: number;
  /** The worker process that fetched it (active). */
  worker: string | null;
  startedAt: number | null;
  output?: unknown;
  /** Who queued it: ingestion and the operator's writes, or delivery's own machinery. */
  origin: 'write' | 'delivery';
  queuedAt: number;
}

/**
 * A meter-delivery-batch job (queues.ts): the keys of one chunk of the hourly report, at most
 * MAX_BATCH_KEYS, in key order (outbox.ts enqueueBatchDeliveries). No `short` policy and no dead letter:
 * a job that fails is retried with the delivery backoff up to its own retry limit, then ends failed
 * (its keys' rows are the sweep's).
 */
export interface BatchJob {
  id: string;
  keys: KeyRef[];
  state: 'created' | 'retry' | 'active' | 'completed' | 'failed';
  startAfter: number;
  retryCount: number;
  seq: number;
  worker: string | null;
  startedAt: number | null;
  queuedAt: number;
  /**
   * Keys of the job a worker has taken through deliverBatch in this attempt (its slices so far): what
   * each of them needs next is its own meter-delivery job. Not a column: what the checks know.
   */
  through: number;
}

/** A copy in meter-delivery-dead: the key's payload and the outcome, under the job's name. */
export interface DeadLetter {
  name: string;
  key: KeyRef;
  output: unknown;
  at: number;
}

/** pg-boss's options of meter-delivery that the model uses. */
export interface BossOptions {
  retryLimit: number;
  retryDelaySeconds: number;
  retryDelayMaxSeconds: number;
  expireInSeconds: number;
}

/** A destination's usage window (rows older are expired): Stripe's 35 days, Metronome's 34. */
export function pastWindowMs(destination: Destination): number {
  return destination === 'metronome' ? METRONOME_PAST_WINDOW_MS : STRIPE_PAST_WINDOW_MS;
}

/** How much later than its key's wait a follow-up may come due and still be that wait's wake-up. */
const FOLLOW_UP_SLACK_MS = 5_000;

/** Until when a key cannot be called anyway: its lease, its pacing, its backoff. */
export function keyBusyUntil(k: KeyRow | undefined): number {
  if (!k) return 0;
  return Math.max(
    k.leaseOwner ? (k.leaseExpiresAt?.getTime() ?? 0) : 0,
    k.nextCallAt.getTime(),
    k.retryAt?.getTime() ?? 0,
  );
}

/** What a standby holds of the model (ModelDb.snapshot). */
export interface ModelState {
  rows: Row[];
  keys: Map<string, KeyRow>;
  keyRefs: Map<string, KeyRef>;
  jobs: Map<string, Job>;
  nextRowId: number;
  nextJobId: number;
  jobSeq: number;
  batchJobs: Map<string, BatchJob>;
  deadLetters: DeadLetter[];
  reported: Set<string>;
}

export class ModelDb {
  rows: Row[] = [];
  keys = new Map<string, KeyRow>();
  /** The key each row of `keys` belongs to (keyName is not parsed back). */
  private keyRefs = new Map<string, KeyRef>();
  /**
   * The longest lease a claim or renewal has set (a worker's lease grows with its slow claims,
   * lease-length.ts): a crashed worker's keys wait for up to that long.
   */
  longestLeaseMs = 0;
  /** Keys each batch (owner) has leased, for the mutation renewCountsLostKeys only. */
  private everLeased = new Map<string, number>();
  jobs = new Map<string, Job>();
  /** The queue meter-delivery-batch (the hourly report's hand-off). */
  batchJobs = new Map<string, BatchJob>();
  /** The hourly reports' dedupe keys (meter_outbox.dedupe_key): organization, destination and hour. */
  private reported = new Set<string>();
  /** The queue meter-delivery-dead: one copy a dead-lettered key, whichever queue delivered it. */
  deadLetters: DeadLetter[] = [];
  private nextRowId = 1;
  private nextJobId = 1;
  private jobSeq = 0;
  /** Row nonces: not part of what a failover sets back (a uuid is drawn, not counted). */
  private nonceSeq = 1;
  /** Keys a claim still running has locked (its statement started, not yet committed): the reaper skips them. */
  readonly claiming = new Map<string, number>();

  /** Called with a job's start time when one is queued or retried: pg-boss's NOTIFY, or the wake-up when it comes due. */
  onJob: (startAfter: number) => void = () => {};
  /** The same for a meter-delivery-batch job. */
  onBatchJob: (startAfter: number) => void = () => {};

  constructor(
    private readonly now: () => number,
    private readonly random: () => number,
    readonly boss: BossOptions,
    /** Rules of the design broken on purpose (mutations.ts); none in a normal run. */
    readonly mutations: ReadonlySet<Mutation> = new Set(),
    /** meter-delivery-batch's options (queues.ts); the model's meter-delivery ones when not given. */
    readonly batchBoss: BossOptions = boss,
  ) {}

  // ─── what ingestion and the operator write ───────────────────────────────────────────────────

  /**
   * An ingestion transaction: one usage row and its key's job (one queued job per key: `short`).
   * `handOff`: the transaction already holds the job of a later key, so a job it must insert for this
   * key (none queued) takes a name of its own (outbox.ts handOffName).
   */
  ingest(
    key: KeyRef & { organizationId: string },
    value: bigint,
    occurredAt: number,
    handOff = false,
  ): { row: Row; job: Job | null } {
    const row = this.insertRow({
      organizationId: key.organizationId,
      customerId: key.customerId,
      eventName: key.eventName,
      destination: destinationOf(key),
      kind: 'usage',
      value,
      occurredAt,
      correctsId: null,
    });
    return { row, job: this.insertJob(key, this.now(), 'write', handOff) };
  }

  /** A usage correction (admin/corrections.ts): one correction row per voided usage row, and a job. */
  void(original: Row, value: bigint): Row {
    const row = this.insertRow({
      organizationId: original.organizationId,
      customerId: original.customerId,
      eventName: original.eventName,
      destination: original.destination,
      kind: 'correction',
      value,
      occurredAt: original.occurredAt,
      correctsId: original.id,
    });
    this.insertJob(original, this.now(), 'write');
    return row;
  }

  /**
   * One chunk of the hourly active_sensors report in one transaction (active-sensors.ts
   * reportActiveSensorsChunk): a row for each of `targets` (an organization's customer at each
   * destination in force at `hour`) not yet reported for the hour (the dedupe key: organization,
   * destination, hour), its key's delivery row where missing (insertMissingKeys), and the written rows'
   * keys handed to delivery as meter-delivery-batch jobs of at most `maxKeys` keys in key order
   * (outbox.ts enqueueBatchDeliveries). On one node a row whose key has no other pending row is written
   * already identified, as the claim would name a group of that one row (singleRowIdentifier).
   */
  report(
    hour: number,
    targets: readonly (KeyRef & { organizationId: string; value: bigint })[],
    maxKeys: number,
  ): { rows: Row[]; jobs: BatchJob[] } {
    const rows: Row[] = [];
    for (const t of targets) {
      const destination = destinationOf(t);
      const dedupeKey = `${t.organizationId}|${destination}|${hour}`;
      if (this.reported.has(dedupeKey)) continue;
      this.reported.add(dedupeKey);
      const alone = this.pendingOf(t).length === 0 && hour > this.now() - 86_400_000;
      const row = this.insertRow({
        organizationId: t.organizationId,
        customerId: t.customerId,
        eventName: 'active_sensors',
        destination,
        kind: 'usage',
        value: t.value,
        occurredAt: hour,
        correctsId: null,
      });
      if (alone) {
        row.identifier = this.groupIdentifier(t, row.id, [row]);
        row.identifiedAt = this.now();
      }
      if (!this.keys.has(keyName(t)))
        this.setKey(t, {
          leaseOwner: null,
          leaseExpiresAt: null,
          nextCallAt: new Date(-8.64e15),
          retryAt: null,
          hold: null,
        });
      rows.push(row);
    }
    const keys = [...new Map(rows.map((r) => [singletonKeyOf(r), keyRef(r)]))]
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .map(([, k]) => k);
    const jobs: BatchJob[] = [];
    for (let i = 0; i < keys.length; i += maxKeys) {
      const job: BatchJob = {
        id: `b${this.nextJobId++}`,
        keys: keys.slice(i, i + maxKeys),
        state: 'created',
        startAfter: this.now(),
        retryCount: 0,
        seq: this.jobSeq++,
        worker: null,
        startedAt: null,
        queuedAt: this.now(),
        through: 0,
      };
      this.batchJobs.set(job.id, job);
      jobs.push(job);
    }
    if (jobs.length > 0) this.onBatchJob(this.now());
    return { rows, jobs };
  }

  private insertRow(
    r: Pick<
      Row,
      | 'organizationId'
      | 'customerId'
      | 'eventName'
      | 'destination'
      | 'kind'
      | 'value'
      | 'occurredAt'
      | 'correctsId'
    >,
  ): Row {
    const row: Row = {
      ...r,
      id: String(this.nextRowId++),
      createdAt: this.now(),
      status: 'pending',
      identifier: null,
      identifiedAt: null,
      attempts: 0,
      acceptedAt: null,
      deliveredAt: null,
      lastError: null,
      correctionAction: null,
      creditNote: false,
      nonce: `n${this.nonceSeq++}`,
      reissues: 0,
    };
    this.rows.push(row);
    return row;
  }

  /** A row as another store wrote it (same id and times): the agreement test mirrors Postgres here. */
  mirror(
    row: Pick<
      Row,
      | 'id'
      | 'organizationId'
      | 'customerId'
      | 'eventName'
      | 'kind'
      | 'value'
      | 'occurredAt'
      | 'createdAt'
      | 'correctsId'
    > &
      Partial<Pick<Row, 'destination'>>,
  ): Row {
    const r: Row = {
      destination: 'stripe',
      ...row,
      status: 'pending',
      identifier: null,
      identifiedAt: null,
      attempts: 0,
      acceptedAt: null,
      deliveredAt: null,
      lastError: null,
      correctionAction: null,
      creditNote: false,
      nonce: `${row.id}@${row.createdAt}`,
      reissues: 0,
    };
    this.rows.push(r);
    this.nextRowId = Math.max(this.nextRowId, Number(row.id) + 1);
    return r;
  }

  /** A key row written (meter_delivery_keys): by its key. */
  setKey(key: KeyRef, row: KeyRow): void {
    this.keys.set(keyName(key), row);
    this.keyRefs.set(keyName(key), keyRef(key));
  }

  /**
   * The rows from the first one that may be pending (the scans of pending rows start there: rows settle
   * mostly in the order they were written, and a long world keeps thousands settled). Every change that
   * makes a row pending again (a redrive, a reissue, a promoted standby's rows) moves the start back.
   */
  pendingRows(): Row[] {
    while (this.pendingFrom < this.rows.length && this.rows[this.pendingFrom]!.status !== 'pending')
      this.pendingFrom++;
    return this.pendingFrom === 0 ? this.rows : this.rows.slice(this.pendingFrom);
  }
  private pendingFrom = 0;

  pendingOf(key: KeyRef): Row[] {
    return this.pendingRows()
      .filter(
        (r) =>
          r.status === 'pending' &&
          r.organizationId === key.organizationId &&
          r.customerId === key.customerId &&
          r.eventName === key.eventName &&
          r.destination === destinationOf(key),
      )
      .sort((a, b) => a.occurredAt - b.occurredAt || compareIds(a.id, b.id));
  }

  // ─── the delivery statements (DeliveryStore) ─────────────────────────────────────────────────

  claim(
    keys: readonly KeyRef[],
    options: {
      owner: string;
      leaseSeconds: number;
      now: Date;
      maxRows: number;
      sendable: readonly MeterEventName[];
      pastWindowMs?: number;
      takeOverAfterSeconds?: number;
    },
  ): ClaimedKey[] {
    // The database's clock starts the lease and decides the windows (the worker's clock may be off).
    const t = this.mutations.has('leaseFromHostClock') ? options.now.getTime() : this.now();
    const unique = new Map(keys.map((k) => [keyName(k), k]));
    const out: ClaimedKey[] = [];
    for (const [name, key] of unique) {
      const cutoff = t - (options.pastWindowMs ?? pastWindowMs(destinationOf(key))) + EXPIRY_SAFETY_MARGIN_MS;
      const ref = keyRef(key);
      if (!options.sendable.includes(key.eventName)) {
        out.push({ ...ref, state: 'held' });
        continue;
      }
      const decision = leaseDecision(
        this.keys.get(name),
        new Date(this.now()),
        (options.takeOverAfterSeconds ?? 0) * 1000,
      );
      if (decision.state !== 'leased') {
        out.push({ ...ref, state: decision.state, waitMs: Math.ceil(decision.waitMs) });
        continue;
      }
      const row = this.keys.get(name) ?? {
        leaseOwner: null,
        leaseExpiresAt: null,
        nextCallAt: new Date(-8.64e15),
        retryAt: null,
        hold: null,
      };
      this.setKey(key, {
        ...row,
        leaseOwner: options.owner,
        leaseExpiresAt: new Date(t + options.leaseSeconds * 1000),
        hold: null,
        // A lease taken over from a batch that never settled: its call may have landed.
        ambiguousCallAt: row.leaseOwner !== null ? new Date(t) : (row.ambiguousCallAt ?? null),
      });
      this.everLeased.set(options.owner, (this.everLeased.get(options.owner) ?? 0) + 1);
      this.longestLeaseMs = Math.max(this.longestLeaseMs, options.leaseSeconds * 1000);

      const pending = this.pendingOf(key);
      let expired = 0;
      for (const r of pending) {
        if (r.kind === 'usage' && r.identifier === null && r.occurredAt < cutoff) {
          r.status = 'expired';
          r.lastError = 'occurred_at outside the window';
          expired++;
        }
      }
      const usage = pending.filter((r) => r.kind === 'usage' && r.status === 'pending');
      const inflight = usage.find((r) => r.identifier !== null && r.acceptedAt === null)?.identifier ?? null;
      // Usage stamped more than FUTURE_ALLOWANCE_SECONDS past the database's clock waits (its key's
      // wake-up comes when it is due: dueInMs); the mutation groups it at once with the valid readings
      // of its key.
      const dueBy = t + FUTURE_ALLOWANCE_SECONDS * 1000;
      const ungrouped = usage.filter(
        (r) =>
          r.identifier === null &&
          r.occurredAt >= cutoff &&
          (r.occurredAt <= dueBy || this.mutations.has('coalesceFuture')),
      );
      let members: Row[] = [];
      let identifier = inflight;
      if (inflight) {
        members = usage.filter((r) => r.identifier === inflight);
      } else if (ungrouped.length > 0) {
        const firstId = ungrouped[0]!.id;
        const rows = nextGroupRows(
          ungrouped.map((r) => ({
            ...r,
            value: r.value.toString(),
            occurredAt: new Date(r.occurredAt),
            createdAt: new Date(r.createdAt),
          })),
          options.maxRows,
        );
        const ids = new Set(rows.map((r) => r.id));
        members = ungrouped.filter((r) => ids.has(r.id));
        identifier = this.groupIdentifier(key, firstId, members);
        for (const r of members) {
          r.identifier = identifier;
          r.identifiedAt = this.now();
        }
      }
      const otherInflight = usage.some(
        (r) => r.identifier !== null && r.acceptedAt === null && r.identifier !== inflight,
      );
      const moreUsage = inflight ? ungrouped.length > 0 || otherInflight : ungrouped.length > members.length;
      const corrections = pending.some((r) => r.kind === 'correction');
      const ahead = usage.filter((r) => r.identifier === null && r.occurredAt > dueBy);
      const dueAt = Math.min(...ahead.map((r) => r.occurredAt)) - FUTURE_ALLOWANCE_SECONDS * 1000;
      const group =
        identifier && members.length > 0 ? this.groupOf(key.eventName, identifier, members) : null;
      if (group && renewableGroup(row, group.identifiedAt)) group.renewable = true;
      out.push({
        ...ref,
        state: 'leased',
        group,
        expired,
        corrections,
        moreUsage,
        ...(!moreUsage && ahead.length > 0 ? { dueInMs: Math.max(0, Math.ceil(dueAt - t)) } : {}),
      });
    }
    return out;
  }

  /** The identifier of a usage group of `key` (the claim's naming): the key's first ungrouped row and the rows' digest. */
  private groupIdentifier(key: KeyRef, firstId: Row['id'], members: readonly Row[]): string {
    const m = destinationOf(key) === 'metronome' ? 'm' : '';
    const meter = key.eventName === 'active_sensors' ? 'as' : 'tr';
    return `mb_${m}${meter}_${firstId}_${this.identifierOf(members)}`;
  }

  /**
   * A group's identifier from the rows it carries: a regroup of the same rows (after a failover lost
   * the claim that grouped them) gets the same identifier, so the destination deduplicates it.
   */
  private identifierOf(members: readonly Row[]): string {
    if (this.mutations.has('randomIdentifiers'))
      return Math.floor(this.random() * 2 ** 32)
        .toString(16)
        .padStart(8, '0');
    let h = 0x811c9dc5;
    for (const r of members)
      for (const ch of `${r.nonce}/${r.reissues};`) h = Math.imul(h ^ ch.charCodeAt(0), 0x01000193) >>> 0;
    return h.toString(16).padStart(8, '0');
  }

  private groupOf(eventName: MeterEventName, identifier: string, members: readonly Row[]): ClaimedGroup {
    const { value, timestamp } = groupValue(
      eventName,
      members.map((r) => ({
        id: r.id,
        value: r.value.toString(),
        occurredAt: new Date(r.occurredAt),
        createdAt: new Date(r.createdAt),
      })),
    );
    return {
      identifier,
      value,
      timestamp,
      rows: members.length,
      oldestCreatedAt: new Date(Math.min(...members.map((r) => r.createdAt))),
      attempts: Math.max(...members.map((r) => r.attempts)),
      identifiedAt: new Date(Math.min(...members.map((r) => r.identifiedAt ?? r.createdAt))),
    };
  }

  settle(
    groups: readonly GroupSettlement[],
    keys: readonly KeySettlement[],
    options: { owner: string; minIntervalMs: number },
  ): number {
    const t = this.now();
    // A batch whose key was reaped or taken (a frozen worker, a slow statement) has lost it: what it
    // learned is dropped, and the key's next owner sends the same identifiers again. A lease that ran
    // out but is still the batch's own (nobody reaped or took it) is still held.
    const held = (name: string) => this.keys.get(name)?.leaseOwner === options.owner;
    const refuse = (name: string) => !held(name) && !this.mutations.has('settleStaleLease');
    const pending = this.pendingRows();
    for (const g of groups) {
      for (const r of pending) {
        if (r.identifier !== g.identifier || r.status !== 'pending' || refuse(keyName(r))) continue;
        if (g.status === 'renew') {
          r.identifier = null;
          r.reissues++;
        } else if (g.status !== 'pending' && g.status !== 'accepted') r.status = g.status;
        if (g.status === 'accepted') r.acceptedAt = t;
        r.lastError = g.status === 'delivered' || g.status === 'accepted' ? null : (g.error ?? r.lastError);
        r.attempts += g.counted ? 1 : 0;
        if (g.status === 'delivered') r.deliveredAt = t;
      }
    }
    let refused = 0;
    for (const k of keys) {
      const name = keyName(k);
      const row = this.keys.get(name);
      if (!held(name)) refused++;
      if (!row || row.leaseOwner !== options.owner || refuse(name)) continue;
      this.keys.set(name, {
        ...row,
        leaseOwner: null,
        leaseExpiresAt: null,
        nextCallAt: k.called
          ? new Date(Math.max(row.nextCallAt.getTime(), t + options.minIntervalMs))
          : row.nextCallAt,
        retryAt: k.backoffMs !== undefined ? new Date(t + k.backoffMs) : k.called ? null : row.retryAt,
        ambiguousCallAt: k.ambiguous ? new Date(t) : (row.ambiguousCallAt ?? null),
      });
    }
    return refused;
  }

  release(owner: string, nextCallAt: Date): number {
    let n = 0;
    for (const [name, row] of this.keys) {
      if (row.leaseOwner !== owner) continue;
      this.keys.set(name, {
        ...row,
        leaseOwner: null,
        leaseExpiresAt: null,
        nextCallAt: new Date(Math.max(row.nextCallAt.getTime(), nextCallAt.getTime())),
        ambiguousCallAt: new Date(this.now()),
      });
      n++;
    }
    return n;
  }

  renew(owner: string, leaseSeconds: number): number {
    const t = this.now();
    this.longestLeaseMs = Math.max(this.longestLeaseMs, leaseSeconds * 1000);
    let n = 0;
    for (const [name, row] of this.keys) {
      // Still the batch's own, run out or not (renewLeases): nobody reaped or took it.
      if (row.leaseOwner !== owner) continue;
      // Only ever extends (renewLeasesOf's greatest): renewals in flight together land in any order.
      const until = Math.max(row.leaseExpiresAt?.getTime() ?? 0, t + leaseSeconds * 1000);
      this.keys.set(name, { ...row, leaseExpiresAt: new Date(until) });
      n++;
    }
    return this.mutations.has('renewCountsLostKeys') ? (this.everLeased.get(owner) ?? n) : n;
  }

  hold(keys: readonly KeyRef[]): void {
    for (const k of keys) {
      const row = this.keys.get(keyName(k)) ?? {
        leaseOwner: null,
        leaseExpiresAt: null,
        nextCallAt: new Date(-8.64e15),
        retryAt: null,
        hold: null,
      };
      this.setKey(k, { ...row, hold: 'meter_missing' });
    }
  }

  /** releaseHeldKeys: every key of a destination held for a meter, freed and returned (the caller queues them). */
  releaseHeld(eventName: MeterEventName, destination: Destination = 'stripe'): KeyRef[] {
    const out: KeyRef[] = [];
    for (const [name, row] of this.keys) {
      const ref = this.keyRefs.get(name)!;
      if (row.hold === null || ref.eventName !== eventName || destinationOf(ref) !== destination) continue;
      this.keys.set(name, { ...row, hold: null });
      out.push(ref);
    }
    return out;
  }

  /** expiredLeaseKeys: the keys whose lease ran out with an owner left, read without freeing them. */
  expiredLeaseKeys(takeOverAfterMs = 0): KeyRef[] {
    const t = this.now() - takeOverAfterMs;
    const out: KeyRef[] = [];
    for (const [name, row] of this.keys)
      if (row.leaseOwner !== null && row.leaseExpiresAt && row.leaseExpiresAt.getTime() < t)
        out.push(this.keyRefs.get(name)!);
    return out;
  }

  /** reapLeases: leases past their expiry with an owner left. */
  reap(takeOverAfterMs = 0): KeyRef[] {
    const t = this.now();
    const out: KeyRef[] = [];
    for (const [name, row] of this.keys) {
      if (
        row.leaseOwner === null ||
        !row.leaseExpiresAt ||
        row.leaseExpiresAt.getTime() + takeOverAfterMs >= t
      )
        continue;
      this.keys.set(name, { ...row, leaseOwner: null, leaseExpiresAt: null, ambiguousCallAt: new Date(t) });
      out.push(this.keyRefs.get(name)!);
    }
    return out;
  }

  /** orphanedJobs (lease-reaper.ts): active jobs older than `olderThanMs` whose key holds no live lease. */
  orphans(olderThanMs: number, takeOverAfterMs = 0): Job[] {
    const t = this.now();
    return [...this.jobs.values()].filter((j) => {
      if (j.state !== 'active' || j.startedAt === null || j.startedAt >= t - olderThanMs) return false;
      // A claim still running holds its keys' rows locked: the reaper's SKIP LOCKED passes them by.
      if (this.claiming.has(keyName(j.key)) && !this.mutations.has('reaperRequeuesRunningClaim'))
        return false;
      const k = this.keys.get(keyName(j.key));
      return !(k?.leaseOwner && k.leaseExpiresAt && k.leaseExpiresAt.getTime() + takeOverAfterMs >= t);
    });
  }

  switchToCompensate(key: KeyRef, identifier: string, owner?: string): void {
    if (owner !== undefined) {
      // switchCorrectionToCompensate: only while the batch still owns the key (its lease may have run
      // out, as long as nobody reaped or took it), the settle's rule.
      const row = this.keys.get(keyName(key));
      if (row?.leaseOwner !== owner)
        throw new Error('stale lease: the correction switch is left to the next owner of the key');
    }
    for (const r of this.rows)
      if (r.organizationId === key.organizationId && r.identifier === identifier && r.status === 'pending')
        r.correctionAction = 'compensate';
  }

  /** claimCorrectionGroup (corrections.ts). */
  claimCorrections(key: KeyRef, options: { now: Date; validationSeconds: number }): CorrectionFacts {
    const settled = { neverBilled: 0, creditNote: 0 };
    const now = options.now.getTime();
    const validatedBefore = now - options.validationSeconds * 1000;
    const corrections = () => this.pendingOf(key).filter((r) => r.kind === 'correction');
    const byId = (id: string | null) => (id === null ? undefined : this.rows.find((r) => r.id === id));
    const correctionGroup = (identifier: string) => {
      const rows = this.rows.filter((r) => r.identifier === identifier && r.status === 'pending');
      const original = byId(rows[0]?.correctsId ?? null);
      if (rows.length === 0 || !original?.identifier) return null;
      return {
        identifier,
        action: rows[0]!.correctionAction ?? 'compensate',
        originalIdentifier: original.identifier,
        value: rows.reduce((s, r) => s + r.value, 0n).toString(),
        timestamp: new Date(Math.max(...rows.map((r) => r.occurredAt))),
        rows: rows.length,
        oldestCreatedAt: new Date(Math.min(...rows.map((r) => r.createdAt))),
        attempts: Math.max(...rows.map((r) => r.attempts)),
        identifiedAt: new Date(Math.min(...rows.map((r) => r.identifiedAt ?? r.createdAt))),
      };
    };
    const inflight = corrections().find((r) => r.identifier !== null);
    if (inflight?.identifier)
      return {
        group: correctionGroup(inflight.identifier),
        settled,
        waitUntil: null,
        blocked: 0,
        waitingOnUsage: 0,
      };

    for (;;) {
      const head = corrections().find((c) => {
        if (c.identifier !== null) return false;
        const o = byId(c.correctsId);
        return (
          o !== undefined &&
          (o.status === 'delivered' ||
            o.status === 'expired' ||
            (o.status === 'pending' && o.acceptedAt !== null && o.acceptedAt < validatedBefore))
        );
      });
      if (!head) break;
      const original = byId(head.correctsId)!;
      if (original.status === 'expired' || !original.identifier) {
        head.status = 'expired';
        head.lastError = 'the original usage expired before Stripe recorded it: nothing was billed';
        settled.neverBilled++;
        continue;
      }
      const eventIds = new Set(
        this.rows.filter((r) => r.identifier === original.identifier && r.kind === 'usage').map((r) => r.id),
      );
      const sameEvent = (r: Row) =>
        r.kind === 'correction' && r.correctsId !== null && eventIds.has(r.correctsId);
      const ungroupedSame = this.rows.filter(
        (r) => sameEvent(r) && r.status === 'pending' && r.identifier === null,
      );
      if (head.occurredAt < now - pastWindowMs(destinationOf(key)) + 3600 * 1000) {
        for (const r of ungroupedSame) {
          r.status = 'expired';
          r.creditNote = true;
        }
        settled.creditNote += ungroupedSame.length;
        continue;
      }
      // Metronome cannot void an event: its corrections always compensate.
      const action =
        destinationOf(key) !== 'stripe'
          ? 'compensate'
          : correctionAction({
              others: this.rows.filter(
                (r) => sameEvent(r) && (r.status !== 'pending' || r.identifier !== null),
              ).length,
              originalTotal: this.rows
                .filter((r) => r.identifier === original.identifier && r.kind === 'usage')
                .reduce((s, r) => s + r.value, 0n)
                .toString(),
              pendingTotal: ungroupedSame.reduce((s, r) => s + r.value, 0n).toString(),
              originalReceivedAt:
                original.deliveredAt !== null
                  ? new Date(original.deliveredAt)
                  : original.acceptedAt !== null
                    ? new Date(original.acceptedAt)
                    : null,
              now: options.now,
            });
      const m = destinationOf(key) === 'metronome' ? 'm' : '';
      const identifier = `mb_${m}trc_${head.id}_${this.identifierOf(ungroupedSame)}`;
      for (const r of ungroupedSame) {
        r.identifier = identifier;
        r.correctionAction = action;
        r.identifiedAt = this.now();
      }
      const group = correctionGroup(identifier);
      if (group) return { group, settled, waitUntil: null, blocked: 0, waitingOnUsage: 0 };
    }
    const waiting = corrections().filter((c) => c.identifier === null);
    const originals = waiting.map((c) => byId(c.correctsId)).filter((o): o is Row => o !== undefined);
    const validating = originals
      .filter((o) => o.status === 'pending' && o.acceptedAt !== null)
      .map((o) => o.acceptedAt!);
    return {
      group: null,
      settled,
      waitUntil:
        validating.length > 0 ? new Date(Math.min(...validating) + options.validationSeconds * 1000) : null,
      blocked: originals.filter((o) => o.status === 'failed').length,
      waitingOnUsage: originals.filter((o) => o.status === 'pending' && o.acceptedAt === null).length,
    };
  }

  // ─── around delivery ─────────────────────────────────────────────────────────────────────────

  /**
   * failReportedEvents: the delivered and pending rows an error report names become failed (pending:
   * v2 rows in validation, and rows whose answer is not settled yet: the report may come first).
   */
  failReported(identifier: string, code: string): number {
    let n = 0;
    for (const r of this.rows) {
      if (r.identifier !== identifier) continue;
      // Mutation reportSparesUnsettled: only the rows already answered (the rule before seeds 2043/2131).
      const unsettled = r.status === 'pending' && r.acceptedAt === null;
      if (unsettled && this.mutations.has('reportSparesUnsettled')) continue;
      if (r.status === 'delivered' || r.status === 'pending') {
        r.status = 'failed';
        r.lastError = `stripe error report: ${code}`;
        n++;
      }
    }
    return n;
  }

  /** promoteValidated: v2 rows past their validation window are delivered. */
  promote(validationMs: number): number {
    const t = this.now();
    let n = 0;
    for (const r of this.pendingRows()) {
      if (r.status === 'pending' && r.acceptedAt !== null && r.acceptedAt < t - validationMs) {
        r.status = 'delivered';
        r.deliveredAt = r.acceptedAt;
        n++;
      }
    }
    return n;
  }

  /** staleKeys (sweep.ts): keys with stale pending rows that nothing covers, oldest first. */
  staleKeys(staleMs: number, limit: number): KeyRef[] {
    const t = this.now();
    const oldest = new Map<string, { key: KeyRef; at: number }>();
    for (const r of this.pendingRows()) {
      if (r.status !== 'pending' || r.acceptedAt !== null || r.createdAt >= t - staleMs) continue;
      // Usage stamped ahead and not yet due is not stranded (its wake-up job brings it).
      if (r.kind === 'usage' && r.identifier === null && r.occurredAt > t + FUTURE_ALLOWANCE_SECONDS * 1000)
        continue;
      const name = keyName(r);
      const k = this.keys.get(name);
      if (
        k &&
        !(
          k.hold === null &&
          k.nextCallAt.getTime() <= t &&
          (k.retryAt === null || k.retryAt.getTime() <= t) &&
          (k.leaseExpiresAt === null || k.leaseExpiresAt.getTime() < t)
        )
      )
        continue;
      if (r.kind === 'correction' && this.rows.find((u) => u.id === r.correctsId)?.status === 'failed')
        continue;
      const seen = oldest.get(name);
      if (!seen || r.createdAt < seen.at) oldest.set(name, { key: keyRef(r), at: r.createdAt });
    }
    // A job deferred to the future covers nothing now: the key's rows would wait for it.
    const covered = new Set(
      [...this.jobs.values()]
        .filter(
          (j) =>
            (j.state === 'created' || j.state === 'retry') &&
            (j.startAfter <= t || this.mutations.has('deferredBlocksWrites')),
        )
        .map((j) => j.name),
    );
    // A queued or retrying meter-delivery-batch job covers the keys it names (sweep.ts), an active one
    // none: it may be a dead or frozen worker's (mutation sweepCountsActiveBatchJob: it covers them too).
    for (const b of this.batchJobs.values())
      if (
        b.state === 'created' ||
        b.state === 'retry' ||
        (b.state === 'active' && this.mutations.has('sweepCountsActiveBatchJob'))
      )
        for (const k of b.keys) covered.add(singletonKeyOf(k));
    return [...oldest.values()]
      .sort((a, b) => a.at - b.at)
      .slice(0, limit * 5)
      .map((o) => o.key)
      .filter((k) => !covered.has(singletonKeyOf(k)))
      .slice(0, limit);
  }

  /**
   * retryFailedRows (redrive.ts) with its guard: failed groups within the identifier window become
   * pending again (same identifier), their keys taken from any batch holding them, and their keys get
   * a job; groups past it are returned, untouched, for a reconciliation first.
   */
  redrive(windowOf: (destination: Destination) => number): {
    rows: number;
    refused: string[];
    resent: string[];
    /** Leases taken from the batches holding the keys: each such batch's settle will be refused. */
    revoked: number;
  } {
    const now = new Date(this.now());
    const groups = new Map<string, Row[]>();
    for (const r of this.rows) {
      if (r.status !== 'failed' || r.identifier === null) continue;
      groups.set(r.identifier, [...(groups.get(r.identifier) ?? []), r]);
    }
    let rows = 0;
    let revoked = 0;
    const refused: string[] = [];
    const resent: string[] = [];
    for (const [identifier, members] of groups) {
      const identifiedAt = Math.min(...members.map((r) => r.identifiedAt ?? r.createdAt));
      const identifierWindowMs = windowOf(members[0]!.destination);
      if (
        redriveVerdict({ identifiedAt: new Date(identifiedAt) }, now, { identifierWindowMs }) !== 'resend'
      ) {
        refused.push(identifier);
        continue;
      }
      // The group's key is taken from any batch holding it first (takeKeysFromBatches): that batch's
      // settle is refused, so its answer for the group's identifier never lands on the reset rows. The
      // lease and its end stay (the batch's calls may run until then).
      const name = keyName(members[0]!);
      const key = this.keys.get(name);
      if (
        key?.leaseOwner &&
        key.leaseOwner === leaseGrantedTo(key.leaseOwner) &&
        !this.mutations.has('redriveLeavesLease')
      ) {
        this.keys.set(name, { ...key, leaseOwner: revokedLeaseOwner(key.leaseOwner) });
        revoked++;
      }
      for (const r of members) {
        r.status = 'pending';
        this.pendingFrom = 0;
        r.acceptedAt = null;
        r.attempts = 0;
        if (this.mutations.has('wrongIdentifierWindow')) r.identifiedAt = this.now();
        rows++;
      }
      resent.push(identifier);
      this.insertJob(members[0]!, this.now(), 'write');
    }
    return { rows, refused, resent, revoked };
  }

  /**
   * A group as the destination would have it: its event's timestamp (the newest row's time) and
   * signed value (a correction takes back: negative; a cancel takes back its original, at the
   * original's time).
   */
  eventOf(identifier: string): {
    destination: Destination;
    customerId: string;
    eventName: MeterEventName;
    timestamp: number;
    value: bigint;
  } | null {
    const rows = this.rows.filter((r) => r.identifier === identifier);
    const head = rows[0];
    if (!head) return null;
    const sum = rows.reduce((s, r) => s + r.value, 0n);
    if (head.kind === 'usage') {
      return {
        destination: head.destination,
        customerId: head.customerId,
        eventName: head.eventName,
        timestamp: Math.max(...rows.map((r) => r.occurredAt)),
        value: sum,
      };
    }
    if (head.correctionAction === 'cancel') {
      const original = this.rows.find((r) => r.id === head.correctsId);
      const event = original?.identifier ? this.eventOf(original.identifier) : null;
      return event ? { ...event, value: -sum } : null;
    }
    return {
      destination: head.destination,
      customerId: head.customerId,
      eventName: head.eventName,
      timestamp: Math.max(...rows.map((r) => r.occurredAt)),
      value: -sum,
    };
  }

  /** Every event meterbox knows it billed (delivered groups), as eventOf describes them. */
  billedEvents(): NonNullable<ReturnType<ModelDb['eventOf']>>[] {
    const ids = new Set(
      this.rows.filter((r) => r.status === 'delivered' && r.identifier !== null).map((r) => r.identifier!),
    );
    return [...ids].map((id) => this.eventOf(id)).filter((e): e is NonNullable<typeof e> => e !== null);
  }

  /** The reconciled redrive of a group past the window: Stripe does not have it → a new identifier; it does → delivered. */
  reissue(identifier: string, present: boolean): void {
    for (const r of this.rows) {
      if (r.identifier !== identifier || r.status !== 'failed') continue;
      if (present) {
        r.status = 'delivered';
        r.deliveredAt = this.now();
      } else {
        r.status = 'pending';
        this.pendingFrom = 0;
        r.identifier = null;
        r.identifiedAt = null;
        r.reissues++;
        r.acceptedAt = null;
        r.attempts = 0;
        this.insertJob(r, this.now(), 'write');
      }
    }
  }

  // ─── pg-boss's meter-delivery queue ──────────────────────────────────────────────────────────

  /**
   * boss.insert with the `short` policy: refused when the key already has a created job due no later
   * than the key can next be called (its lease, its pacing, its backoff). A follow-up deferred past that (a v2
   * validation's end) is queued apart from the key's due job, so a new reading never waits for it.
   * `handOff` (ingestion only): a job inserted is named `<key>#handoff:<id>` (outbox.ts handOffName),
   * which no insert is refused for and the sweep does not count as the key's.
   */
  insertJob(
    key: KeyRef,
    startAfter: number,
    origin: Job['origin'] = 'delivery',
    handOff = false,
  ): Job | null {
    // pg-boss's singletonKey: customer, meter and destination (a customer has pending rows in one
    // organization at a time).
    const name = singletonKeyOf(key);
    const k = this.keys.get(keyName(key));
    // (A follow-up is queued a statement or two after its key's wait was read: seconds of slack.)
    const due = Math.max(this.now(), startAfter, keyBusyUntil(k) + FOLLOW_UP_SLACK_MS);
    for (const j of this.jobs.values()) {
      if (j.name !== name || j.state !== 'created') continue;
      if (j.startAfter <= due || this.mutations.has('deferredBlocksWrites')) return null;
    }
    const id = `j${this.nextJobId++}`;
    const job: Job = {
      id,
      key: keyRef(key),
      name: handOff ? `${name}#handoff:${id}` : name,
      state: 'created',
      startAfter,
      retryCount: 0,
      seq: this.jobSeq++,
      priority: key.eventName === 'temperature_readings' ? 1 : 0,
      worker: null,
      startedAt: null,
      origin,
      queuedAt: this.now(),
    };
    this.jobs.set(job.id, job);
    this.onJob(startAfter);
    return job;
  }

  fetch(limit: number, worker: string): Job[] {
    const t = this.now();
    const due = [...this.jobs.values()]
      .filter((j) => (j.state === 'created' || j.state === 'retry') && j.startAfter <= t)
      .sort((a, b) => b.priority - a.priority || a.startAfter - b.startAfter || a.seq - b.seq)
      .slice(0, limit);
    for (const j of due) {
      j.state = 'active';
      j.worker = worker;
      j.startedAt = t;
    }
    return due;
  }

  finish(id: string, status: 'completed' | 'deadletter', output?: unknown): void {
    const j = this.jobs.get(id);
    if (j?.state !== 'active') return;
    j.state = status;
    j.output = output;
    if (status === 'deadletter') this.deadLetters.push({ name: j.name, key: j.key, output, at: this.now() });
    this.retire(j);
  }

  /**
   * deadLetterKeys (job-completion.ts): a key dead-lettered inside a batch job gets a meter-delivery job of
   * its own, `<key>#dead:<id>`, inserted and failed with no retry in one transaction, so that
   * meter-delivery-dead holds the same copy a key's own job leaves.
   */
  deadLetterKeys(dead: readonly { key: KeyRef; output: unknown }[]): number {
    for (const d of dead) {
      const id = `j${this.nextJobId++}`;
      this.jobSeq++;
      this.deadLetters.push({
        name: `${singletonKeyOf(d.key)}#dead:${id}`,
        key: keyRef(d.key),
        output: d.output,
        at: this.now(),
      });
    }
    return dead.length;
  }

  // ─── pg-boss's meter-delivery-batch queue ────────────────────────────────────────────────────

  /** One due batch job (batchSize 1), made active for this process: the oldest first. */
  fetchBatchJob(worker: string): BatchJob | null {
    const t = this.now();
    let next: BatchJob | null = null;
    for (const b of this.batchJobs.values()) {
      if ((b.state !== 'created' && b.state !== 'retry') || b.startAfter > t) continue;
      if (!next || b.startAfter < next.startAfter || (b.startAfter === next.startAfter && b.seq < next.seq))
        next = b;
    }
    if (!next) return null;
    next.state = 'active';
    next.worker = worker;
    next.startedAt = t;
    next.through = 0;
    return next;
  }

  /**
   * A batch job's handler returned (completed) or threw (failed: retried with backoff and jitter, or
   * failed for good past its retry limit); fenced to the attempt `retryCount` fetched, as pg-boss is.
   */
  endBatchJob(id: string, retryCount: number, outcome: 'completed' | 'failed'): void {
    const b = this.batchJobs.get(id);
    if (b?.state !== 'active' || b.retryCount !== retryCount) return;
    if (outcome === 'completed') {
      b.state = 'completed';
      this.batchJobs.delete(id);
      return;
    }
    if (b.retryCount >= this.batchBoss.retryLimit) {
      b.state = 'failed';
      this.batchJobs.delete(id);
      return;
    }
    b.retryCount++;
    const base = this.batchBoss.retryDelaySeconds * 2 ** Math.min(16, b.retryCount);
    const delay = Math.min(this.batchBoss.retryDelayMaxSeconds, base / 2 + (base / 2) * this.random());
    b.state = 'retry';
    b.worker = null;
    b.startAfter = this.now() + delay * 1000;
    this.onBatchJob(b.startAfter);
  }

  /** A handler that threw (or a job that expired): pg-boss's retry with backoff and jitter, or its dead letter. */
  fail(id: string): void {
    const j = this.jobs.get(id);
    if (j?.state !== 'active') return;
    if (j.retryCount >= this.boss.retryLimit) {
      j.state = 'failed';
      this.retire(j);
      return;
    }
    j.retryCount++;
    const base = this.boss.retryDelaySeconds * 2 ** Math.min(16, j.retryCount);
    const delay = Math.min(this.boss.retryDelayMaxSeconds, base / 2 + (base / 2) * this.random());
    j.state = 'retry';
    j.worker = null;
    j.startAfter = this.now() + delay * 1000;
    this.onJob(j.startAfter);
  }

  /** pg-boss's supervisor: active jobs past expireInSeconds fail (and are retried). */
  expireJobs(): void {
    const t = this.now();
    for (const j of [...this.jobs.values()]) {
      if (j.state === 'active' && j.startedAt !== null && j.startedAt + this.boss.expireInSeconds * 1000 < t)
        this.fail(j.id);
    }
    for (const b of [...this.batchJobs.values()]) {
      if (
        b.state === 'active' &&
        b.startedAt !== null &&
        b.startedAt + this.batchBoss.expireInSeconds * 1000 < t
      )
        this.endBatchJob(b.id, b.retryCount, 'failed');
    }
  }

  /** Finished jobs are deleted (JOB_RETENTION_SECONDS): the model keeps only what a check reads. */
  private retire(j: Job): void {
    this.jobs.delete(j.id);
  }

  // ─── a standby ───────────────────────────────────────────────────────────────────────────────

  /** What a standby has: everything committed so far (the rows and jobs copied, key rows are values). */
  snapshot(): ModelState {
    return {
      rows: this.rows.map((r) => ({ ...r })),
      keys: new Map(this.keys),
      keyRefs: new Map(this.keyRefs),
      jobs: new Map([...this.jobs].map(([id, j]) => [id, { ...j }])),
      nextRowId: this.nextRowId,
      nextJobId: this.nextJobId,
      jobSeq: this.jobSeq,
      batchJobs: new Map([...this.batchJobs].map(([id, b]) => [id, { ...b }])),
      deadLetters: [...this.deadLetters],
      reported: new Set(this.reported),
    };
  }

  /** The standby promoted: the database is what it had; what it lacked is gone. */
  promoteStandby(state: ModelState): void {
    this.rows = state.rows.map((r) => ({ ...r }));
    this.pendingFrom = 0;
    this.keys = new Map(state.keys);
    this.keyRefs = new Map(state.keyRefs);
    this.jobs = new Map([...state.jobs].map(([id, j]) => [id, { ...j }]));
    this.nextRowId = state.nextRowId;
    this.nextJobId = state.nextJobId;
    this.jobSeq = state.jobSeq;
    this.batchJobs = new Map([...state.batchJobs].map(([id, b]) => [id, { ...b }]));
    this.deadLetters = [...state.deadLetters];
    this.reported = new Set(state.reported);
    // The old primary's sessions are gone, and the locks of its running claims with them.
    this.claiming.clear();
  }

  // ─── what the checks read ────────────────────────────────────────────────────────────────────

  hourOfRow(r: Row): number {
    return hourOf(new Date(r.occurredAt));
  }
}
