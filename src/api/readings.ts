// POST /v1/readings: validate the whole batch, then store it and its meter outbox row (and the
// Idempotency-Key answer, when one is sent) in one transaction: a group's statement, a keyed request's
// own statement, or a transaction of its own.
import type { Context as HonoContext } from 'hono';
import type { z } from 'zod';
import type { Context } from '../context-type.js';
import { apiKeyAuth } from '../http/auth.js';
import { AppError, type ErrorDetail } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import type { AppEnv, HttpModule } from '../http/types.js';
import { readJson } from '../http/validate.js';
import { deliveryWake } from '../ingest/delivery-wake.js';
import { GroupCommitter, type GroupGate, storeRequest, WriteAlone } from '../ingest/group-commit.js';
import {
  findStoredResponse,
  isValidIdempotencyKey,
  requestHash,
  type StoredResponse,
  storeResponse,
} from '../ingest/idempotency.js';
import { jobStatistics } from '../ingest/job-statistics.js';
import type { StoreReadingsOutcome } from '../ingest/readings.js';
import { parseReadingsFast, readingsRequestSchema, readingsResponseSchema } from '../ingest/schemas.js';
import { storeKeyedAtOnce } from '../ingest/single-node.js';
import { activeSpan, inSpan, SpanKind, traceparentOf } from '../observability/tracing.js';

const PATH = '/v1/readings';

function invalidBatch(details: ErrorDetail[]): AppError {
  return new AppError(422, 'validation_failed', 'the batch was rejected; nothing was stored', details);
}

/** One detail per offending reading (its index and every reason), plus any batch-level problems. */
export function readingIssueDetails(issues: readonly z.core.$ZodIssue[]): ErrorDetail[] {
  const byIndex = new Map<number, { fields: Set<string>; messages: string[] }>();
  const batch: ErrorDetail[] = [];
  for (const issue of issues) {
    const [top, index, ...rest] = issue.path;
    if (top === 'readings' && typeof index === 'number') {
      const entry = byIndex.get(index) ?? { fields: new Set<string>(), messages: [] };
      entry.fields.add(rest.map(String).join('.'));
      entry.messages.push(issue.message);
      byIndex.set(index, entry);
    } else {
      const field = issue.path.map(String).join('.');
      batch.push(field ? { field, message: issue.message } : { message: issue.message });
    }
  }
  const perReading = [...byIndex.entries()]
    .sort(([a], [b]) => a - b)
    .map(([index, { fields, messages }]): ErrorDetail => {
      const [field] = fields;
      return fields.size === 1 && field
        ? { index, field, message: messages.join('; ') }
        : { index, message: messages.join('; ') };
    });
  return [...batch, ...perReading];
}

/** Thrown inside the transaction when a concurrent request with the same key committed first. */
class IdempotencyKeyTaken extends Error {}

function replay(c: HonoContext<AppEnv>, stored: StoredResponse, hash: string): Response {
  if (stored.requestHash !== hash) {
    throw new AppError(
      409,
      'idempotency_conflict',
      'this Idempotency-Key was already used with a different request body',
    );
  }
  c.header('Idempotent-Replayed', 'true');
  return c.json(stored.body as object, stored.status as 201);
}

export function readingsRoutes(ctx: Context, gate?: GroupGate): HttpModule {
  const schemaOptions = {
    maxBatch: ctx.config.READINGS_MAX_BATCH,
    now: () => ctx.clock.now(),
    retentionDays: ctx.config.READINGS_RETENTION_DAYS,
  };
  const schema = readingsRequestSchema(schemaOptions);
  const retentionMs = ctx.config.IDEMPOTENCY_KEY_RETENTION_HOURS * 3600 * 1000;
  // A wake-up refused only leaves the job to the workers' poll: a debug line, not a warning.
  const wake = deliveryWake(ctx.db, (err) =>
    ctx.log.debug({ err }, 'delivery workers not woken after a commit'),
  );
  // The sweep analyzes the table too: a look that failed is a debug line.
  const jobsQueued = jobStatistics(ctx.db, (err) =>
    ctx.log.debug({ err }, 'job table statistics not refreshed'),
  );
  const oneStatement = ctx.config.INGEST_GROUP_ONE_STATEMENT === 'on';
  // Requests are written in groups (group-commit.ts). A keyed request joins one too, its answer stored
  // with the group's readings: on one node by the group's statement (without group commit: its own,
  // storeKeyedAtOnce), on Citus in its shard group's transaction; when they could not (a refused
  // statement, a transaction), it is written in a transaction of its own.
  const groups =
    ctx.config.INGEST_GROUP_WINDOW_MS > 0
      ? new GroupCommitter(ctx, {
          windowMs: ctx.config.INGEST_GROUP_WINDOW_MS,
          flush: ctx.config.INGEST_GROUP_FLUSH,
          oneStatement,
          maxRequests: ctx.config.INGEST_GROUP_MAX_REQUESTS,
          maxReadings: ctx.config.INGEST_GROUP_MAX_READINGS,
          maxInFlight: ctx.config.INGEST_GROUP_MAX_IN_FLIGHT,
          gate,
          wake,
          jobsQueued,
          onGroup: (written) => ctx.metrics.ingestGroups.inc({ written }),
        })
      : undefined;
  const routes = documentedRoutes(PATH);
  // With the adaptive flush the committer counts the requests on their way from their first moment: a
  // request it handles alone is written at once, one with others on their way waits for them (the
  // window). Only that rule reads the count, so with INGEST_GROUP_FLUSH=window it adds nothing to a request.
  if (groups && ctx.config.INGEST_GROUP_FLUSH === 'adaptive') {
    routes.app.use('*', async (c, next) => {
      const ended = c.req.method === 'POST' ? groups.started() : undefined;
      try {
        await next();
      } finally {
        ended?.();
      }
    });
  }
  routes.app.use('*', apiKeyAuth(ctx));

  routes.route(
    {
      method: 'post',
      path: PATH,
      summary:
        'Store a batch of readings (all or nothing) and bill the readings actually stored. Optional ' +
        'Idempotency-Key header: the same key and body replay the first answer; another body is 409.',
      tag: 'ingestion',
      security: 'apiKey',
      body: schema,
      responses: {
        201: { description: 'stored; duplicates were already stored', schema: readingsResponseSchema },
      },
    },
    (c) =>
      // The request's span (a child of the HTTP server span when the operator's SDK instruments HTTP;
      // else the request's own, continuing an incoming traceparent): its context goes on the outbox row.
      inSpan(
        'meterbox.readings.ingest',
        {
          kind: activeSpan() ? SpanKind.INTERNAL : SpanKind.SERVER,
          headers: { get: (name) => c.req.header(name), names: () => Object.keys(c.req.header()) },
          attributes: { 'meterbox.organization_id': c.get('organizationId') },
        },
        (span) => ingest(c, traceparentOf(span)),
      ),
  );

  /** A written request's answer: 201 with its counts, or 422 with its problems (nothing of it stored). */
  function answered(c: HonoContext<AppEnv>, outcome: StoreReadingsOutcome): Response {
    if (!outcome.stored) throw invalidBatch(outcome.problems);
    ctx.metrics.readingsIngested.inc(outcome.result.inserted);
    return c.json(outcome.result, 201);
  }

  async function ingest(c: HonoContext<AppEnv>, traceparent: string | null): Promise<Response> {
    const organizationId = c.get('organizationId');
    const key = c.req.header('idempotency-key');
    if (key !== undefined && !isValidIdempotencyKey(key)) {
      throw new AppError(400, 'bad_request', 'Idempotency-Key must be 1 to 255 printable ASCII characters');
    }
    const body = await readJson(c);
    const now = ctx.clock.now();
    const notBefore = new Date(now.getTime() - retentionMs);
    // Hono caches the body text readJson read, so hashing it costs no second read.
    const hash = key === undefined ? undefined : requestHash('POST', PATH, await c.req.text());
    const answer =
      key !== undefined && hash !== undefined ? { key, requestHash: hash, notBefore } : undefined;
    // The key's live answer, replayed whatever the request's body says now (409 for another body).
    const replayed = async (): Promise<Response | undefined> => {
      const stored = answer && (await findStoredResponse(ctx.db, organizationId, answer.key, notBefore));
      return stored ? replay(c, stored, answer.requestHash) : undefined;
    };

    // A well-formed batch skips zod; anything else gets zod's verdict and its error details.
    const fast = parseReadingsFast(body, schemaOptions);
    let readings = fast?.readings;
    if (!readings) {
      const parsed = schema.safeParse(body);
      if (!parsed.success) {
        const first = await replayed();
        if (first) return first;
        throw invalidBatch(readingIssueDetails(parsed.error.issues));
      }
      readings = parsed.data.readings;
    }
    const request = { organizationId, readings, traceparent, wire: fast?.wire };
    if (groups && !answer) return answered(c, await groups.submit(request));
    // A keyed request (or no group commit). Its answer is stored with its readings by its group (which
    // looks the key up itself: a live answer stores nothing of the request): on one node the group's
    // statement, on Citus its shard group's transaction; without group commit on one node, by a statement
    // of its own; else, or when those could not, by a transaction of its own, which replays a live
    // answer for the key.
    const distributed = await ctx.distributed();
    const atOnce = oneStatement && !distributed;
    if (answer && groups && (atOnce || distributed)) {
      try {
        const outcome = await groups.submit({ ...request, answer });
        // Refused (a sensor unknown or inactive now): the key's answer, if it has one, else the refusal.
        return outcome.stored ? answered(c, outcome) : ((await replayed()) ?? answered(c, outcome));
      } catch (err) {
        if (!(err instanceof WriteAlone)) throw err;
      }
      const first = await replayed();
      if (first) return first;
    } else if (answer) {
      const first = await replayed();
      if (first) return first;
      const alone = atOnce ? await storeKeyedAtOnce(ctx.db, request, now, answer) : null;
      if (alone) {
        // Its jobs are committed: the workers are woken, as after a group's statement (delivery-wake.ts).
        if (alone.queued.jobs + alone.queued.batchJobs > 0) {
          wake(alone.queued);
          jobsQueued(alone.queued.jobs + alone.queued.batchJobs);
        }
        return answered(c, alone.outcome);
      }
    }
    // A group of one; on a distributed database, the router statements of its shard group (routed.ts).
    try {
      const result = await ctx.db.transaction().execute(async (trx) => {
        const outcome = await storeRequest(trx, ctx.boss, request, now, distributed);
        if (!outcome.stored) throw invalidBatch(outcome.problems);
        const stored = outcome.result;
        if (answer) {
          const saved = await storeResponse(
            trx,
            organizationId,
            answer.key,
            { requestHash: answer.requestHash, status: 201, body: stored },
            now,
            notBefore,
          );
          if (!saved) throw new IdempotencyKeyTaken();
        }
        return stored;
      });
      // Counted here, after the commit, from the result object (a replay stores nothing).
      ctx.metrics.readingsIngested.inc(result.inserted);
      return c.json(result, 201);
    } catch (err) {
      if (!(err instanceof IdempotencyKeyTaken)) throw err;
      // Our transaction rolled back; the winner's answer is committed and is the answer to this key.
      const first = await replayed();
      if (!first) throw new AppError(409, 'idempotency_conflict', 'this Idempotency-Key is in use; retry');
      return first;
    }
  }

  return routes;
}
