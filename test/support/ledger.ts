// The ledger check every fault scenario ends with: for each organization, the usage the Stripe
// emulator accepted (deduplicated by identifier) equals the readings stored; no outbox row is left
// pending, failed or expired; every accepted identifier matches the outbox rows that carry it,
// and no identifier was accepted with two different values. Usage corrections: voided readings are
// not "stored" here (Stripe must no longer hold them), an event cancelled by an adjustment is not
// billed, and a compensating event carries minus its correction rows' value.

import type { Kysely } from 'kysely';
import { sql } from 'kysely';
import type { DB } from '../../src/db/schema.js';

export interface LedgerOrganization {
  organizationId: string;
  customerId: string;
  /** Rows in temperature_readings for the organization, voided ones (usage corrections) excluded. */
  readingsStored: number;
}

export interface LedgerOutboxRow {
  organizationId: string;
  eventName: string;
  value: number;
  status: string;
  identifier: string | null;
  /** 'correction' rows take readings back: their identifier's event carries minus their value. */
  kind?: string;
}

export interface LedgerEvent {
  identifier: string;
  customer: string;
  event_name: string;
  value: number;
  /** Set when a meter event adjustment cancelled the event: Stripe no longer bills it. */
  cancelledAt?: number;
}

export interface LedgerViolation {
  organizationId: string | null;
  kind:
    | 'usage_missing'
    | 'usage_doubled'
    | 'undelivered_rows'
    | 'identifier_value_conflict'
    | 'identifier_mismatch'
    | 'unknown_identifier';
  message: string;
  /** accepted minus stored for usage mismatches; accepted minus outbox for identifier mismatches. */
  difference?: number;
}

export interface LedgerReport {
  ok: boolean;
  organizations: number;
  readingsStored: number;
  readingsAccepted: number;
  violations: LedgerViolation[];
}

const METER = 'temperature_readings';

export function checkLedger(input: {
  organizations: readonly LedgerOrganization[];
  outbox: readonly LedgerOutboxRow[];
  events: readonly LedgerEvent[];
  /** Outbox statuses tolerated at the end of a scenario (default: only delivered). */
  allowedStatuses?: readonly string[];
}): LedgerReport {
  const violations: LedgerViolation[] = [];
  const allowed = new Set(input.allowedStatuses ?? ['delivered']);
  const orgByCustomer = new Map(input.organizations.map((o) => [o.customerId, o]));

  // Accepted events, deduplicated by identifier (what Stripe bills); a second value is a violation.
  const accepted = new Map<string, LedgerEvent>();
  for (const event of input.events) {
    if (event.event_name !== METER) continue;
    const first = accepted.get(event.identifier);
    if (!first) {
      accepted.set(event.identifier, event);
    } else if (first.value !== event.value || first.customer !== event.customer) {
      violations.push({
        organizationId: orgByCustomer.get(event.customer)?.organizationId ?? null,
        kind: 'identifier_value_conflict',
        message: `identifier ${event.identifier} accepted with values ${first.value} and ${event.value}`,
        difference: event.value - first.value,
      });
    }
  }

  // Every accepted identifier must be exactly the sum of the outbox rows grouped under it.
  const outboxByIdentifier = new Map<string, { value: number; organizationId: string }>();
  for (const row of input.outbox) {
    if (row.eventName !== METER || row.identifier === null) continue;
    const entry = outboxByIdentifier.get(row.identifier) ?? { value: 0, organizationId: row.organizationId };
    entry.value += row.kind === 'correction' ? -row.value : row.value;
    outboxByIdentifier.set(row.identifier, entry);
  }
  for (const event of accepted.values()) {
    const rows = outboxByIdentifier.get(event.identifier);
    const org = orgByCustomer.get(event.customer);
    if (!rows) {
      violations.push({
        organizationId: org?.organizationId ?? null,
        kind: 'unknown_identifier',
        message: `identifier ${event.identifier} (value ${event.value}) was accepted but no outbox row carries it`,
        difference: event.value,
      });
    } else if (rows.value !== event.value || (org && rows.organizationId !== org.organizationId)) {
      violations.push({
        organizationId: org?.organizationId ?? rows.organizationId,
        kind: 'identifier_mismatch',
        message: `identifier ${event.identifier}: accepted ${event.value}, its outbox rows hold ${rows.value}${org && rows.organizationId !== org.organizationId ? ' of another organization' : ''}`,
        difference: event.value - rows.value,
      });
    }
  }

  let readingsStored = 0;
  let readingsAccepted = 0;
  for (const org of input.organizations) {
    let sum = 0;
    for (const event of accepted.values()) {
      if (event.customer === org.customerId && event.cancelledAt === undefined) sum += event.value;
    }
    readingsStored += org.readingsStored;
    readingsAccepted += sum;
    const difference = sum - org.readingsStored;
    if (difference < 0) {
      violations.push({
        organizationId: org.organizationId,
        kind: 'usage_missing',
        message: `${org.readingsStored} readings stored, ${sum} accepted by Stripe: ${-difference} never billed`,
        difference,
      });
    } else if (difference > 0) {
      violations.push({
        organizationId: org.organizationId,
        kind: 'usage_doubled',
        message: `${org.readingsStored} readings stored, ${sum} accepted by Stripe: ${difference} billed twice`,
        difference,
      });
    }
    const stuck = input.outbox.filter(
      (r) => r.organizationId === org.organizationId && !allowed.has(r.status),
    );
    if (stuck.length > 0) {
      const byStatus: Record<string, number> = {};
      for (const r of stuck) byStatus[r.status] = (byStatus[r.status] ?? 0) + 1;
      violations.push({
        organizationId: org.organizationId,
        kind: 'undelivered_rows',
        message: `outbox rows not delivered: ${JSON.stringify(byStatus)} (value ${stuck.reduce((s, r) => s + r.value, 0)})`,
        difference: -stuck.reduce((s, r) => s + r.value, 0),
      });
    }
  }
  return {
    ok: violations.length === 0,
    organizations: input.organizations.length,
    readingsStored,
    readingsAccepted,
    violations,
  };
}

/** Reads what checkLedger needs for the given organizations from the database. */
export async function loadLedger(
  db: Kysely<DB>,
  orgs: readonly { organizationId: string; customerId: string }[],
): Promise<{ organizations: LedgerOrganization[]; outbox: LedgerOutboxRow[] }> {
  const ids = orgs.map((o) => o.organizationId);
  const counts = await sql<{ organization_id: string; n: string }>`
    SELECT organization_id, count(*) AS n FROM temperature_readings
    WHERE organization_id = ANY(${ids}::uuid[]) AND voided_at IS NULL GROUP BY organization_id`.execute(db);
  const stored = new Map(counts.rows.map((r) => [r.organization_id, Number(r.n)]));
  const rows = await db
    .selectFrom('meter_outbox')
    .select(['organization_id', 'event_name', 'value', 'status', 'identifier', 'kind'])
    .where('organization_id', 'in', ids.length > 0 ? ids : ['00000000-0000-0000-0000-000000000000'])
    .execute();
  return {
    organizations: orgs.map((o) => ({ ...o, readingsStored: stored.get(o.organizationId) ?? 0 })),
    outbox: rows.map((r) => ({
      organizationId: r.organization_id,
      eventName: r.event_name,
      value: Number(r.value),
      status: r.status,
      identifier: r.identifier,
      kind: r.kind,
    })),
  };
}

/**
 * The ledger of `orgs`: their rows read from the database against the destination's `events` for their
 * customers (other tests' customers share the emulator).
 */
export async function ledgerOf(
  db: Kysely<DB>,
  orgs: readonly { organizationId: string; customerId: string }[],
  events: readonly LedgerEvent[],
): Promise<LedgerReport> {
  const customers = new Set(orgs.map((o) => o.customerId));
  return checkLedger({
    ...(await loadLedger(db, orgs)),
    events: events.filter((e) => customers.has(e.customer)),
  });
}

export function formatReport(scenario: string, report: LedgerReport, destination = 'Stripe'): string {
  const head = `${scenario}: ledger ${report.ok ? 'OK' : 'VIOLATED'} — ${report.organizations} organizations, ${report.readingsStored} readings stored, ${report.readingsAccepted} accepted by ${destination}`;
  return [
    head,
    ...report.violations.map((v) => `  ✗ org ${v.organizationId ?? '?'} ${v.kind}: ${v.message}`),
  ].join('\n');
}
