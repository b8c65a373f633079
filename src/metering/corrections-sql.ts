// The corrections' own statements: the claim of a key's next correction group, which decides its
// Stripe call (cancel or compensate, corrections.ts says Stripe's rules) and commits its identifier
// before any call, and the switch of a group to compensate under the batch's lease.
import { type Kysely, sql, type Transaction } from 'kysely';
import type { CorrectionAction, DB } from '../db/schema.js';
import { correctionIdentifier } from './identifiers.js';
import { METRONOME_PAST_WINDOW_MS } from './metronome.js';
import { correctionAction } from './rules/corrections.js';
import { type CorrectionFacts, type CorrectionGroup, destinationOf, type KeyRef } from './rules/keys.js';
import { MAX_IDENTIFIER_LENGTH, STRIPE_PAST_WINDOW_MS } from './stripe-meter.js';

/** Compensations this close to Stripe's 35-day limit are not attempted (same margin as usage rows). */
const COMPENSATE_SAFETY_MARGIN_MS = 3600 * 1000;

/** What the correction claim of a key found (rules/decide-batch.ts decides what follows from it). */
export type CorrectionClaim = CorrectionFacts;

interface GroupRow {
  value: string;
  timestamp: Date | null;
  oldest: Date | null;
  identified: Date | null;
  rows: number;
  attempts: number | null;
  action: CorrectionAction | null;
  original: string | null;
}

/**
 * Makes the transaction's commit wait for the disk whatever the server's synchronous_commit, as the
 * usage claim's does (docs/architecture.md, "Commits that may be lost"): a correction's identifier and
 * its switch to compensate are committed before their call, and a commit lost after the call would let
 * the next claim send a second negative event (a double credit). Set inside a statement (it holds
 * through PgBouncer's transaction mode) that reads the group's rows: on Citus a router SELECT, so it
 * runs on the node whose commit must wait (a modification's functions run on the coordinator).
 */
async function commitDurably(
  trx: Transaction<DB>,
  organizationId: string,
  identifier: string,
): Promise<void> {
  await sql`SELECT set_config('synchronous_commit', 'on', true) FROM meter_outbox
             WHERE organization_id = ${organizationId} AND identifier = ${identifier} LIMIT 1`.execute(trx);
}

/**
 * Start of the organization's current billing period, from what webhooks told us: the newest stored
 * subscription event's current_period_start (on the subscription before 2025-03-31.basil, on its
 * items since); otherwise one month before subscriptions.current_period_end. Null: nothing known.
 */
async function currentPeriodStart(db: Kysely<DB>, organizationId: string): Promise<Date | null> {
  const result = await sql<{ start: Date | null }>`
    SELECT coalesce(
      (SELECT to_timestamp(coalesce(
                (e.payload #>> '{data,object,current_period_start}')::bigint,
                (e.payload #>> '{data,object,items,data,0,current_period_start}')::bigint))
         FROM stripe_events e
        WHERE e.event_type LIKE 'customer.subscription.%'
          AND e.payload #>> '{data,object,id}' = s.stripe_subscription_id
        ORDER BY e.stripe_created DESC LIMIT 1),
      s.current_period_end - interval '1 month') AS start
      FROM subscriptions s WHERE s.organization_id = ${organizationId}`.execute(db);
  const start = result.rows[0]?.start;
  return start ? new Date(start) : null;
}

/**
 * The grouping rule for corrections: one group = the pending correction rows that take readings
 * back from ONE Stripe event (the same original identifier, hence one customer, meter and UTC
 * hour); never mixed with usage rows or with another event's corrections. A group already claimed
 * (crash, retryable error) is resent unchanged first. Rows wait while their original usage is
 * unsent (pending: the key's usage goes first), still validating at Stripe (v2: until `waitUntil`)
 * or failed (held until it is redriven: `blocked`); rows whose original expired were never billed.
 * An original whose v2 validation window passed is as good as delivered (the sweep promotes it a
 * little later). The action is decided here, committed with the identifier before any call:
 * - the original's billing period is already invoiced (or beyond Stripe's 35 days): no call, the
 *   rows become `expired` with credit_note_required (never sent into another period);
 * - cancel: the group takes back ALL of the original event (every reading it billed is voided), no
 *   other correction touched that event, and Stripe received it less than CANCEL_WINDOW_MS ago;
 * - compensate otherwise.
 */
export async function claimCorrectionGroup(
  db: Kysely<DB>,
  key: KeyRef,
  options: { now: Date; validationSeconds?: number },
): Promise<CorrectionClaim> {
  // Every statement names the key's organization: one shard group on Citus (a router query).
  const { organizationId: org, customerId, eventName } = key;
  // Metronome (issue 34): no event can be cancelled, so every group compensates; its invoices are
  // Metronome's own (meterbox learns no billing period from it), so only its 34-day window limits a
  // compensation.
  const destination = destinationOf(key);
  const pastWindowMs = destination === 'metronome' ? METRONOME_PAST_WINDOW_MS : STRIPE_PAST_WINDOW_MS;
  const settled = { neverBilled: 0, creditNote: 0 };
  const validatedBefore = new Date(options.now.getTime() - (options.validationSeconds ?? 0) * 1000);
  const groupSql = (identifier: string) => sql<GroupRow>`
    SELECT coalesce(sum(c.value), 0)::text AS value, max(c.occurred_at) AS timestamp,
           min(c.created_at) AS oldest, min(coalesce(c.identified_at, c.created_at)) AS identified,
           count(*)::int AS rows, max(c.attempts)::int AS attempts,
           min(c.correction_action) AS action, min(o.identifier) AS original
      FROM meter_outbox c JOIN meter_outbox o ON o.id = c.corrects_outbox_id AND o.organization_id = c.organization_id
     WHERE c.organization_id = ${org} AND o.organization_id = ${org}
       AND c.identifier = ${identifier} AND c.status = 'pending'`;
  const toGroup = (identifier: string, g: GroupRow | undefined): CorrectionGroup | null =>
    g && g.rows > 0 && g.timestamp && g.oldest && g.action && g.original
      ? {
          identifier,
          action: g.action,
          originalIdentifier: g.original,
          value: g.value,
          timestamp: new Date(g.timestamp),
          rows: g.rows,
          oldestCreatedAt: new Date(g.oldest),
          attempts: g.attempts ?? 0,
          identifiedAt: new Date(g.identified ?? g.oldest),
        }
      : null;
  const found = (group: CorrectionGroup | null): CorrectionClaim => ({
    group,
    settled,
    waitUntil: null,
    blocked: 0,
    waitingOnUsage: 0,
  });

  const inflight = await sql<{ identifier: string }>`
    SELECT identifier FROM meter_outbox
     WHERE organization_id = ${org}
       AND stripe_customer_id = ${customerId} AND event_name = ${eventName} AND destination = ${destination}
       AND status = 'pending' AND kind = 'correction' AND identifier IS NOT NULL
     ORDER BY occurred_at, id LIMIT 1`.execute(db);
  const resend = inflight.rows[0]?.identifier;
  if (resend) return found(toGroup(resend, (await groupSql(resend).execute(db)).rows[0]));

  for (;;) {
    const head = await sql<{
      id: string;
      organization_id: string;
      original_status: string;
      original_identifier: string | null;
      original_delivered_at: Date | null;
      occurred_at: Date;
    }>`
      SELECT c.id, c.organization_id, o.status AS original_status, o.identifier AS original_identifier,
             coalesce(o.delivered_at, o.accepted_at) AS original_delivered_at, c.occurred_at
        -- A correction row and the usage row it corrects belong to one organization (one shard on Citus).
        FROM meter_outbox c JOIN meter_outbox o ON o.id = c.corrects_outbox_id AND o.organization_id = c.organization_id
       WHERE c.organization_id = ${org} AND o.organization_id = ${org}
         AND c.stripe_customer_id = ${customerId} AND c.event_name = ${eventName}
         AND c.destination = ${destination}
         AND c.status = 'pending' AND c.kind = 'correction' AND c.identifier IS NULL
         AND (o.status IN ('delivered', 'expired')
              OR (o.status = 'pending' AND o.accepted_at IS NOT NULL AND o.accepted_at < ${validatedBefore}))
       ORDER BY c.occurred_at, c.id LIMIT 1`.execute(db);
    const h = head.rows[0];
    if (!h) break;

    if (h.original_status === 'expired' || !h.original_identifier) {
      const r = await sql`
        UPDATE meter_outbox SET status = 'expired', updated_at = now(),
               last_error = 'the original usage expired before Stripe recorded it: nothing was billed'
         WHERE organization_id = ${org} AND id = ${h.id} AND status = 'pending' AND identifier IS NULL`.execute(
        db,
      );
      settled.neverBilled += Number(r.numAffectedRows ?? 0n);
      continue;
    }
    const original = h.original_identifier;
    const sameEvent = sql`organization_id = ${org} AND corrects_outbox_id IN (
      SELECT id FROM meter_outbox WHERE organization_id = ${org} AND identifier = ${original} AND kind = 'usage')`;

    const occurred = new Date(h.occurred_at);
    const periodStart = destination === 'stripe' ? await currentPeriodStart(db, h.organization_id) : null;
    const tooOld = occurred.getTime() < options.now.getTime() - pastWindowMs + COMPENSATE_SAFETY_MARGIN_MS;
    if ((periodStart && occurred < periodStart) || tooOld) {
      const why = tooOld
        ? `outside the destination's ${Math.round(pastWindowMs / 86_400_000)}-day usage window`
        : `its billing period ended at ${periodStart?.toISOString()}: the invoice is final`;
      const r = await sql`
        UPDATE meter_outbox SET status = 'expired', credit_note_required = true, updated_at = now(),
               last_error = ${`not sent: the original usage is ${why}; issue a credit note`}
         WHERE kind = 'correction' AND status = 'pending' AND identifier IS NULL AND ${sameEvent}`.execute(
        db,
      );
      settled.creditNote += Number(r.numAffectedRows ?? 0n);
      continue;
    }

    const check = await sql<{ original_total: string; pending_total: string; others: number }>`
      SELECT
        (SELECT coalesce(sum(value), 0)::text FROM meter_outbox
          WHERE organization_id = ${org} AND identifier = ${original} AND kind = 'usage') AS original_total,
        (SELECT coalesce(sum(value), 0)::text FROM meter_outbox
          WHERE kind = 'correction' AND status = 'pending' AND identifier IS NULL AND ${sameEvent}) AS pending_total,
        (SELECT count(*)::int FROM meter_outbox
          WHERE kind = 'correction' AND (status <> 'pending' OR identifier IS NOT NULL) AND ${sameEvent}) AS others`.execute(
      db,
    );
    const c = check.rows[0];
    // Metronome cannot void an event: its corrections are always compensating events.
    const action: CorrectionAction =
      destination === 'stripe' && c
        ? correctionAction({
            others: c.others,
            originalTotal: c.original_total,
            pendingTotal: c.pending_total,
            originalReceivedAt: h.original_delivered_at ? new Date(h.original_delivered_at) : null,
            now: options.now,
          })
        : 'compensate';
    // Derived from the rows it names (identifiers.ts): a claim lost with a promoted standby's WAL repeats it.
    const members = await sql<{ id: string; nonce: string | null; value: string; epoch: string | null }>`
      SELECT id::text, nonce::text, value::text, extract(epoch FROM identified_at)::text AS epoch FROM meter_outbox
       WHERE kind = 'correction' AND status = 'pending' AND identifier IS NULL AND ${sameEvent}`.execute(db);
    const identifier = correctionIdentifier(
      { organizationId: org, customerId, eventName, destination },
      members.rows.map((r) => ({ id: r.id, nonce: r.nonce, value: r.value, identifiedAtEpoch: r.epoch })),
      action,
    );
    if (identifier.length > MAX_IDENTIFIER_LENGTH) throw new Error('identifier too long');
    // Committed durably, as the usage claim's identifiers are: this identifier is sent next.
    await db.transaction().execute(async (trx) => {
      await sql`
        UPDATE meter_outbox SET identifier = ${identifier}, correction_action = ${action},
               identified_at = now(), updated_at = now()
         WHERE kind = 'correction' AND status = 'pending' AND identifier IS NULL AND ${sameEvent}
           AND id = ANY(${members.rows.map((r) => r.id)}::bigint[])`.execute(trx);
      await commitDurably(trx, org, identifier);
    });
    const group = toGroup(identifier, (await groupSql(identifier).execute(db)).rows[0]);
    if (group) return found(group);
  }

  // Nothing to send now: what the waiting rows wait for, so the key is looked at again only then.
  const waiting = await sql<{ validating_since: Date | null; blocked: number; unsent: number }>`
    SELECT min(o.accepted_at) FILTER (WHERE o.status = 'pending' AND o.accepted_at IS NOT NULL) AS validating_since,
           count(*) FILTER (WHERE o.status = 'failed')::int AS blocked,
           count(*) FILTER (WHERE o.status = 'pending' AND o.accepted_at IS NULL)::int AS unsent
      FROM meter_outbox c JOIN meter_outbox o ON o.id = c.corrects_outbox_id AND o.organization_id = c.organization_id
     WHERE c.organization_id = ${org} AND o.organization_id = ${org}
       AND c.stripe_customer_id = ${customerId} AND c.event_name = ${eventName} AND c.destination = ${destination}
       AND c.status = 'pending' AND c.kind = 'correction' AND c.identifier IS NULL`.execute(db);
  const w = waiting.rows[0];
  return {
    group: null,
    settled,
    waitUntil: w?.validating_since
      ? new Date(new Date(w.validating_since).getTime() + (options.validationSeconds ?? 0) * 1000)
      : null,
    blocked: w?.blocked ?? 0,
    waitingOnUsage: w?.unsent ?? 0,
  };
}

/** The switch of a correction group from cancel to compensate, committed before the negative event. */
export async function switchCorrectionToCompensate(
  db: Kysely<DB>,
  organizationId: string,
  identifier: string,
  lease?: { owner: string; key: KeyRef },
): Promise<void> {
  await db.transaction().execute(async (trx) => {
    if (lease) {
      // Only while the batch still owns the key, by the rule its settle follows (settleBatch):
      // lease_owner is the batch's own (unique to it), so nobody reaped or leased the key since its
      // claim and no other call for it went out, even if the lease ran out on the way (a renewal late on
      // a slow database; renewals extend such a lease too). A worker whose key was reaped or taken
      // while it was frozen after its cancel call writes nothing: the key's next owner asks again,
      // under the same idempotency key, and switches itself. The row lock orders the switch with a
      // claim taking the key over.
      const { rows } = await sql`
        SELECT 1 FROM meter_delivery_keys
         WHERE organization_id = ${lease.key.organizationId} AND stripe_customer_id = ${lease.key.customerId}
           AND event_name = ${lease.key.eventName} AND destination = ${destinationOf(lease.key)}
           AND lease_owner = ${lease.owner}
           FOR UPDATE`.execute(trx);
      if (rows.length === 0)
        throw new Error('stale lease: the correction switch is left to the next owner of the key');
    }
    await sql`UPDATE meter_outbox SET correction_action = 'compensate', updated_at = now()
               WHERE organization_id = ${organizationId} AND identifier = ${identifier} AND status = 'pending'`.execute(
      trx,
    );
    await commitDurably(trx, organizationId, identifier);
  });
}
