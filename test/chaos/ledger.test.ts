// The fault suite's ledger check must be trustworthy: it reports missing, doubled and mismatched
// usage with the organization and the amount, and accepts a clean ledger.
import { describe, expect, it } from 'vitest';
import { checkLedger, type LedgerEvent, type LedgerOutboxRow } from '../support/ledger.js';

const orgA = { organizationId: 'org-a', customerId: 'cus_a', readingsStored: 30 };
const orgB = { organizationId: 'org-b', customerId: 'cus_b', readingsStored: 5 };
const row = (
  organizationId: string,
  value: number,
  identifier: string | null,
  status = 'delivered',
): LedgerOutboxRow => ({
  organizationId,
  eventName: 'temperature_readings',
  value,
  status,
  identifier,
});
const event = (customer: string, identifier: string, value: number): LedgerEvent => ({
  customer,
  identifier,
  value,
  event_name: 'temperature_readings',
});
const cleanOutbox = [row('org-a', 10, 'id-1'), row('org-a', 20, 'id-1'), row('org-b', 5, 'id-2')];
const cleanEvents = [event('cus_a', 'id-1', 30), event('cus_b', 'id-2', 5)];

describe('checkLedger', () => {
  it('accepts a ledger where every stored reading was accepted once, even when an identifier was resent', () => {
    const report = checkLedger({
      organizations: [orgA, orgB],
      outbox: cleanOutbox,
      events: [...cleanEvents, event('cus_a', 'id-1', 30)],
    });
    expect(report.violations).toEqual([]);
    expect(report.ok).toBe(true);
    expect(report.readingsAccepted).toBe(35);
  });

  it('reports usage that never reached Stripe, naming the organization and the amount', () => {
    const report = checkLedger({
      organizations: [orgA, { ...orgB, readingsStored: 8 }],
      outbox: [...cleanOutbox, row('org-b', 3, 'id-3', 'pending')],
      events: cleanEvents,
    });
    expect(report.ok).toBe(false);
    expect(report.violations).toContainEqual(
      expect.objectContaining({ organizationId: 'org-b', kind: 'usage_missing', difference: -3 }),
    );
    expect(report.violations).toContainEqual(
      expect.objectContaining({ organizationId: 'org-b', kind: 'undelivered_rows' }),
    );
  });

  it('reports usage billed twice under two identifiers', () => {
    const report = checkLedger({
      organizations: [orgA, orgB],
      outbox: [...cleanOutbox, row('org-b', 5, 'id-9')],
      events: [...cleanEvents, event('cus_b', 'id-9', 5)],
    });
    expect(report.ok).toBe(false);
    expect(report.violations).toEqual([
      expect.objectContaining({ organizationId: 'org-b', kind: 'usage_doubled', difference: 5 }),
    ]);
  });

  it('reports an identifier accepted with a value its outbox rows do not hold', () => {
    const report = checkLedger({
      organizations: [{ ...orgA, readingsStored: 31 }, orgB],
      outbox: cleanOutbox,
      events: [event('cus_a', 'id-1', 31), event('cus_b', 'id-2', 5)],
    });
    expect(report.ok).toBe(false);
    expect(report.violations).toEqual([
      expect.objectContaining({ organizationId: 'org-a', kind: 'identifier_mismatch', difference: 1 }),
    ]);
  });

  it('reports one identifier accepted with two different values', () => {
    const report = checkLedger({
      organizations: [orgA, orgB],
      outbox: cleanOutbox,
      events: [...cleanEvents, event('cus_b', 'id-2', 7)],
    });
    expect(report.violations).toContainEqual(
      expect.objectContaining({ organizationId: 'org-b', kind: 'identifier_value_conflict', difference: 2 }),
    );
  });

  it('reports an accepted identifier no outbox row carries', () => {
    const report = checkLedger({
      organizations: [orgA, orgB],
      outbox: cleanOutbox,
      events: [...cleanEvents, event('cus_a', 'id-ghost', 4)],
    });
    expect(report.violations).toContainEqual(
      expect.objectContaining({ organizationId: 'org-a', kind: 'unknown_identifier', difference: 4 }),
    );
    expect(report.violations).toContainEqual(
      expect.objectContaining({ organizationId: 'org-a', kind: 'usage_doubled', difference: 4 }),
    );
  });
});
