// A group's identifier, derived from what the group carries: its key, its rows, its value, and which
// time its rows are grouped (a reconciled redrive regroups rows the destination lacks under a new
// one). A regroup of the same rows repeats the identifier, so a promoted standby that lost a claim
// (docs/architecture.md, "Failover") sends what the destination already has, and its dedupe drops
// it. The format keeps its contract (docs/operations.md): `mb_<m?><tr|as|trc>_<first row id>_<16 hex>`,
// at most ~45 characters (Stripe allows 100, Metronome's transaction_id more).
import { createHash } from 'node:crypto';
import { sql } from 'kysely';
import type { Destination } from '../db/schema.js';

/** Hex digits of the digest kept in an identifier (64 bits: a collision needs the same key and first row). */
const DIGEST_HEX = 16;

/**
 * SQL: the identifier prefix of a new usage group of the key `l` (columns destination, event_name),
 * for a key with no group in flight (`inflight` null) and a first ungrouped row `id`; null otherwise.
 * The digest is appended once the group's rows are known (groupDigest).
 */
export const identifierPrefix = (inflight: string, id: string) =>
  sql.raw(`CASE WHEN ${inflight} IS NULL AND ${id} IS NOT NULL THEN ${prefixOf('l', id)} END`);

/** The prefix's SQL text: `mb_`, the destination's and meter's letters (columns of alias `k`), the first row id. */
const prefixOf = (k: string, id: string) =>
  `'mb_' || CASE ${k}.destination WHEN 'metronome' THEN 'm' ELSE '' END
                       || CASE ${k}.event_name WHEN 'active_sensors' THEN 'as' ELSE 'tr' END || '_' || ${id}`;

/**
 * The digest's SQL text over what a group carries, each given as an expression: its key's columns, its
 * rows (`id:nonce` joined in id order), its value, and its rows' former identified_at epoch ('' if none).
 */
const digestOf = (d: {
  organization: string;
  customer: string;
  eventName: string;
  destination: string;
  rows: string;
  value: string;
  identifiedAt: string;
}) =>
  `substr(md5(concat_ws('|', ${d.organization}, ${d.customer}, ${d.eventName},
                  ${d.destination}, ${d.rows}, ${d.value},
                  ${d.identifiedAt})), 1, ${DIGEST_HEX})`;

/** A row's part of the digest: its id and, when it has one, its nonce (migrations/0031). */
const rowPart = (r: string) => `${r}.id::text || coalesce(':' || ${r}.nonce::text, '')`;

/**
 * SQL aggregate over a group's member rows (columns organization_id, customer, event_name,
 * destination, id, nonce, value, identified_at of alias `m`): the digest of what the group carries. The
 * rows' former identified_at (kept by a reconciled redrive, null for rows never grouped) tells one
 * grouping of the same rows from the next, so the destination never answers "duplicate" for rows it
 * lacks. Epochs, not timestamps as text, so the session's TimeZone never changes it. Each row's nonce
 * (migrations/0031, random at insert) tells a row from a later one that reuses its id after an
 * asynchronous failover; a row without one (written before 0031) is named by its id alone, as before.
 */
export const groupDigest = (m: string) =>
  sql.raw(
    digestOf({
      organization: `min(${m}.organization_id::text)`,
      customer: `min(${m}.customer)`,
      eventName: `min(${m}.event_name)`,
      destination: `min(${m}.destination)`,
      rows: `string_agg(${rowPart(m)}, ',' ORDER BY ${m}.id)`,
      value: `sum(${m}.value)::text`,
      identifiedAt: `coalesce(extract(epoch FROM max(${m}.identified_at))::text, '')`,
    }),
  );

/**
 * SQL: the identifier a claim gives a new usage group of exactly one row never grouped before
 * (identifierPrefix, then groupDigest over that row), from the row's columns organization_id, customer,
 * event_name, destination, id, nonce and value of alias `n`: the hourly report writes its rows with it
 * (active-sensors.ts insertReports), so a claim that regroups the same row repeats it.
 */
export const singleRowIdentifier = (n: string) =>
  sql.raw(
    `${prefixOf(n, `${n}.id`)} || '_' || ${digestOf({
      organization: `${n}.organization_id::text`,
      customer: `${n}.customer`,
      eventName: `${n}.event_name`,
      destination: `${n}.destination`,
      rows: rowPart(n),
      value: `${n}.value::numeric::text`,
      identifiedAt: `''`,
    })}`,
  );

/** The same digest in TypeScript, for the correction claim (corrections-sql.ts), which reads its rows first. */
export function correctionIdentifier(
  key: { organizationId: string; customerId: string; eventName: string; destination: Destination },
  rows: readonly { id: string; nonce: string | null; value: string; identifiedAtEpoch: string | null }[],
  action: string,
): string {
  const sorted = [...rows].sort((a, b) =>
    BigInt(a.id) < BigInt(b.id) ? -1 : BigInt(a.id) > BigInt(b.id) ? 1 : 0,
  );
  const ids = sorted.map((r) => r.id);
  const named = sorted.map((r) => (r.nonce === null ? r.id : `${r.id}:${r.nonce}`));
  const sum = rows.reduce((s, r) => s + BigInt(r.value), 0n);
  const epochs = rows.flatMap((r) => (r.identifiedAtEpoch === null ? [] : [r.identifiedAtEpoch]));
  const generation = epochs.sort((a, b) => Number(a) - Number(b)).at(-1) ?? '';
  const digest = createHash('md5')
    .update(
      [
        key.organizationId,
        key.customerId,
        key.eventName,
        key.destination,
        named.join(','),
        sum.toString(),
        action,
        generation,
      ].join('|'),
    )
    .digest('hex')
    .slice(0, DIGEST_HEX);
  return `mb_${key.destination === 'metronome' ? 'm' : ''}trc_${ids[0]}_${digest}`;
}
