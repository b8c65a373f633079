// What one ingestion group statement costs Postgres, by its shape (`npm run bench -- --ingest --only
// group-cost`): the database's CPU per statement for groups of 1, 8 and 16 single-reading requests whose
// keys all have their delivery job queued (the statement share-locks them) and whose keys are all new
// (the statement inserts one pg-boss job each), against raw Postgres's single-row transactions, in
// segments alternated round after round on one cluster. No API process: the statements go from this
// process through the API's own writer (storeGroupAtOnce) on prepared statements, at most as many at
// once as the API writes (INGEST_GROUP_MAX_IN_FLIGHT's default), so the figures are the database's side
// alone. Derived: the statement's fixed cost (a group of one), what each further request adds, and what
// each queued job adds; that is what decides how large groups must be for the API to match raw. And a
// batch of 500 readings: the API's statement against raw's one insert with its arrays as node-postgres
// sends them (text literals) and in binary (src/db/binary-arrays.ts, as the API sends them): the
// statement cost the batch ratio hinges on, and what binary arrays save Postgres (the arrays' parse, the
// same for both statements).
import { randomBytes } from 'node:crypto';
import { createDatabase } from '../../src/db/database.js';
import type { StatementShape } from '../../src/ingest/group-statement.js';
import { storeGroupAtOnce } from '../../src/ingest/single-node.js';
import { createLogger } from '../../src/log.js';
import type { seededRandom } from '../lib/random.js';
import {
  type Cluster,
  freshDatabase,
  type Org,
  RAW_BATCH_SQL,
  RAW_SINGLE_SQL,
  rawBatchParams,
  seedOrgs,
  serverCpuSeconds,
} from './harness.js';
import { readyWal, walSettingsOf } from './wal.js';

/** Statements at once: the API's INGEST_GROUP_MAX_IN_FLIGHT default (and raw's connections in the ratios). */
const IN_FLIGHT = 4;
const SIZES = [1, 8, 16] as const;
const ROUNDS = 4;
/** Statements a segment runs (new keys need fresh organizations, so segments count statements, not time). */
const STATEMENTS = 600;
/** Batch statements a segment runs (a batch costs about what 5-10 group statements do). */
const BATCH_STATEMENTS = 120;
const BATCH = 500;
/** Organizations whose keys are queued before the segments: picked at random, as requests arrive. */
const QUEUED_ORGS = 10_000;

// 'API group statement': the API's writer with the group's statement, as before a request alone had its own
// (group-statement.ts loneHead): the two side by side in one run.
type BatchSide = 'API statement' | 'API group statement' | 'raw, text arrays' | 'raw, binary arrays';
type Shape =
  | { kind: 'raw' }
  | { kind: 'group'; size: number; keys: 'queued' | 'new'; statement?: StatementShape }
  | { kind: 'batch'; side: BatchSide };

interface Totals {
  statements: number;
  readings: number;
  jobs: number;
  cpuSeconds: number;
  wallSeconds: number;
}

export interface GroupCostRow {
  shape: string;
  statementsPerSecond: number;
  /** Postgres CPU (ms) per statement: a raw row's transaction, or one group statement. */
  cpuMsPerStatement: number;
  cpuMsPerReading: number;
  jobsPerStatement: number;
}

export interface GroupCost {
  conditions: string;
  rows: GroupCostRow[];
  /** A group of one whose key is queued: what every statement costs before its requests. */
  fixedCpuMs: number;
  /** What each request adds to a group whose keys are queued, from 1 to 8 and from 8 to 16. */
  perRequestCpuMs: { from1to8: number; from8to16: number };
  /** What each new key's job adds, per group size. */
  perJobCpuMs: Record<string, number>;
  /** Raw's single-row transaction. */
  rawCpuMsPerRow: number;
  /** A batch of 500 (queued key): the API's statement, raw's insert with text and with binary arrays. */
  batchCpuMs: Record<BatchSide, number>;
}

const label = (s: Shape) =>
  s.kind === 'raw'
    ? 'raw single-row transactions'
    : s.kind === 'batch'
      ? `batches of ${BATCH}, ${s.side}`
      : `groups of ${s.size}, keys ${s.keys}${s.statement === 'group' ? ', the group statement' : ''}`;

export async function runGroupCost(
  cluster: Cluster,
  log: (msg: string) => void,
  /** The bench's seeded draws (its printed seed replays the picks). */
  random: ReturnType<typeof seededRandom>,
): Promise<GroupCost> {
  log('--- group cost: Postgres CPU per ingestion group statement, by shape, against raw single rows');
  const url = await freshDatabase(cluster, 'group_cost');
  const database = createDatabase({
    connectionString: url,
    max: IN_FLIGHT,
    log: createLogger('silent'),
    applicationName: 'meterbox-group-cost',
    preparedStatements: true,
  });
  try {
    await readyWal(database.pool, walSettingsOf('deployment'));
    const tag = randomBytes(2).toString('hex');
    // Groups of 1 with new keys run twice a round: with their own statement and with the group's.
    const freshNeeded = ROUNDS * STATEMENTS * (SIZES.reduce((s, n) => s + n, 0) + 1);
    const queued = await seedOrgs(database.pool, QUEUED_ORGS, 1, `gq${tag}`);
    const fresh = await seedOrgs(database.pool, freshNeeded, 1, `gn${tag}`);
    let instant = Date.now() - 86_400_000;
    const reading = (o: Org) => ({
      sensorId: o.sensors[0]!,
      recordedAt: new Date(instant++).toISOString(),
      temperatureC: 3.5,
    });
    const group = (orgs: readonly Org[]) =>
      orgs.map((o) => ({ organizationId: o.organizationId, readings: [reading(o)] }));
    const batch = (o: Org) => Array.from({ length: BATCH }, () => reading(o));
    // Every queued organization's key gets its job, as a first request of each would.
    for (let i = 0; i < queued.length; i += 16)
      await storeGroupAtOnce(database.db, group(queued.slice(i, i + 16)), new Date());
    log(`  ${queued.length} organizations with their key's job queued, ${fresh.length} without`);

    let freshNext = 0;
    const takeFresh = (size: number) => {
      const taken = fresh.slice(freshNext, freshNext + size);
      freshNext += size;
      return taken;
    };
    const pickQueued = (size: number) => {
      const picked = new Set<Org>();
      while (picked.size < size) picked.add(queued[random.int(queued.length)]!);
      return [...picked];
    };
    const statement = async (shape: Shape): Promise<{ readings: number; jobs: number }> => {
      if (shape.kind === 'raw') {
        const o = queued[random.int(queued.length)]!;
        const r = reading(o);
        await database.pool.query({
          name: 'group-cost-raw',
          text: RAW_SINGLE_SQL,
          values: [r.sensorId, r.recordedAt, o.organizationId, r.temperatureC, new Date()],
        });
        return { readings: 1, jobs: 0 };
      }
      if (shape.kind === 'batch') {
        const o = queued[random.int(queued.length)]!;
        const rows = batch(o);
        if (shape.side === 'API statement' || shape.side === 'API group statement') {
          const { queued: jobs } = await storeGroupAtOnce(
            database.db,
            [{ organizationId: o.organizationId, readings: rows }],
            new Date(),
            shape.side === 'API group statement' ? 'group' : 'auto',
          );
          return { readings: BATCH, jobs: jobs.jobs + jobs.batchJobs };
        }
        await database.pool.query({
          name: 'group-cost-raw-batch',
          text: RAW_BATCH_SQL,
          values: rawBatchParams(o.organizationId, rows, shape.side === 'raw, binary arrays'),
        });
        return { readings: BATCH, jobs: 0 };
      }
      const orgs = shape.keys === 'queued' ? pickQueued(shape.size) : takeFresh(shape.size);
      const { queued: jobs } = await storeGroupAtOnce(database.db, group(orgs), new Date(), shape.statement);
      return { readings: orgs.length, jobs: jobs.jobs + jobs.batchJobs };
    };

    const shapes: Shape[] = [
      { kind: 'raw' },
      ...SIZES.flatMap((size) => [
        { kind: 'group', size, keys: 'queued' } as const,
        { kind: 'group', size, keys: 'new' } as const,
        ...(size === 1
          ? ([
              { kind: 'group', size, keys: 'queued', statement: 'group' },
              { kind: 'group', size, keys: 'new', statement: 'group' },
            ] as const)
          : []),
      ]),
      ...(['API statement', 'API group statement', 'raw, text arrays', 'raw, binary arrays'] as const).map(
        (side) => ({ kind: 'batch', side }) as const,
      ),
    ];
    const totals = new Map<string, Totals>(
      shapes.map((s) => [label(s), { statements: 0, readings: 0, jobs: 0, cpuSeconds: 0, wallSeconds: 0 }]),
    );
    for (let round = 0; round < ROUNDS; round++) {
      for (const shape of shapes) {
        const t = totals.get(label(shape))!;
        // Raw's rows are cheap: as many as its statements take the same order of time as a group segment.
        const count =
          shape.kind === 'raw' ? STATEMENTS * 4 : shape.kind === 'batch' ? BATCH_STATEMENTS : STATEMENTS;
        let left = count;
        const cpu0 = serverCpuSeconds(cluster.dataDir);
        const wall0 = performance.now();
        await Promise.all(
          Array.from({ length: IN_FLIGHT }, async () => {
            while (left > 0) {
              left--;
              const done = await statement(shape);
              t.readings += done.readings;
              t.jobs += done.jobs;
            }
          }),
        );
        t.wallSeconds += (performance.now() - wall0) / 1000;
        t.cpuSeconds += serverCpuSeconds(cluster.dataDir) - cpu0;
        t.statements += count;
      }
      log(`  round ${round + 1} of ${ROUNDS} done`);
    }

    const round4 = (x: number) => Math.round(x * 10_000) / 10_000;
    const rows: GroupCostRow[] = shapes.map((s) => {
      const t = totals.get(label(s))!;
      return {
        shape: label(s),
        statementsPerSecond: Math.round(t.statements / t.wallSeconds),
        cpuMsPerStatement: round4((t.cpuSeconds * 1000) / t.statements),
        cpuMsPerReading: round4((t.cpuSeconds * 1000) / t.readings),
        jobsPerStatement: round4(t.jobs / t.statements),
      };
    });
    for (const r of rows)
      log(
        `  ${r.shape}: ${r.statementsPerSecond} statements/s, Postgres ${r.cpuMsPerStatement} ms CPU a statement (${r.cpuMsPerReading} a reading), ${r.jobsPerStatement} jobs queued a statement`,
      );
    const row = (shape: string) => rows.find((r) => r.shape === shape)!;
    const queuedOf = (size: number) => row(`groups of ${size}, keys queued`);
    const newOf = (size: number) => row(`groups of ${size}, keys new`);
    const result: GroupCost = {
      conditions: `${IN_FLIGHT} statements at once, prepared; ${ROUNDS} rounds of alternated segments of ${STATEMENTS} statements (raw ${STATEMENTS * 4} rows, batches ${BATCH_STATEMENTS}); ${QUEUED_ORGS} organizations with queued keys picked at random`,
      rows,
      fixedCpuMs: queuedOf(1).cpuMsPerStatement,
      perRequestCpuMs: {
        from1to8: round4((queuedOf(8).cpuMsPerStatement - queuedOf(1).cpuMsPerStatement) / 7),
        from8to16: round4((queuedOf(16).cpuMsPerStatement - queuedOf(8).cpuMsPerStatement) / 8),
      },
      perJobCpuMs: Object.fromEntries(
        SIZES.map((size) => {
          const jobs = newOf(size).jobsPerStatement - queuedOf(size).jobsPerStatement;
          const extra = newOf(size).cpuMsPerStatement - queuedOf(size).cpuMsPerStatement;
          return [`groups of ${size}`, jobs > 0 ? round4(extra / jobs) : Number.NaN];
        }),
      ),
      rawCpuMsPerRow: row('raw single-row transactions').cpuMsPerStatement,
      batchCpuMs: {
        'API statement': row(`batches of ${BATCH}, API statement`).cpuMsPerStatement,
        'API group statement': row(`batches of ${BATCH}, API group statement`).cpuMsPerStatement,
        'raw, text arrays': row(`batches of ${BATCH}, raw, text arrays`).cpuMsPerStatement,
        'raw, binary arrays': row(`batches of ${BATCH}, raw, binary arrays`).cpuMsPerStatement,
      },
    };
    log(
      `  a statement's fixed cost ${result.fixedCpuMs} ms; each further request ${result.perRequestCpuMs.from1to8} ms (1 to 8), ${result.perRequestCpuMs.from8to16} ms (8 to 16); each queued job ${Object.values(result.perJobCpuMs).join(' / ')} ms (groups of ${SIZES.join(' / ')}); raw's row ${result.rawCpuMsPerRow} ms`,
    );
    const b = result.batchCpuMs;
    log(
      `  a batch of ${BATCH}: the API's statement ${b['API statement']} ms, raw's insert ${b['raw, text arrays']} ms with text arrays, ${b['raw, binary arrays']} ms with binary (the API's statement ${round4(b['API statement'] / b['raw, text arrays'])}x raw's with text); the group's statement for the same batch ${b['API group statement']} ms`,
    );
    return result;
  } finally {
    await database.db.destroy();
  }
}
