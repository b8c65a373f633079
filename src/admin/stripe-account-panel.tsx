// The dashboard's "Stripe account" panel (issue 25): whether each meter event name has a usable
// Stripe meter (as the worker's meter catalog last found it; a held name's rows stay pending), and
// the open drift the scheduled reconciliation found against Stripe's meter event summaries.
import type { Kysely } from 'kysely';
import type { DB } from '../db/schema.js';

const STATE_TEXT = {
  active: 'active',
  missing: 'missing — usage held',
  inactive: 'deactivated — usage held',
  mismatch: 'settings differ — usage held',
  unknown: 'not readable yet — usage held',
} as const;

async function readPanel(db: Kysely<DB>) {
  const [meters, pending, drift] = await Promise.all([
    db.selectFrom('stripe_meter_catalog').selectAll().orderBy('event_name', 'desc').execute(),
    db
      .selectFrom('meter_outbox')
      .select(['event_name', (eb) => eb.fn.countAll<string>().as('n')])
      .where('status', '=', 'pending')
      .groupBy('event_name')
      .execute(),
    db
      .selectFrom('reconciliation_drift')
      .selectAll()
      .where('destination', '=', 'stripe')
      .where('resolved_at', 'is', null)
      .orderBy('hour', 'desc')
      .limit(50)
      .execute(),
  ]);
  return { meters, pending: new Map(pending.map((p) => [p.event_name, Number(p.n)])), drift };
}

export async function StripeAccountPanel(props: { db: Kysely<DB> }) {
  const { meters, pending, drift } = await readPanel(props.db);
  const held = meters.filter((m) => m.state !== 'active');
  return (
    <section aria-labelledby="stripe-account" data-testid="stripe-account">
      <h2 id="stripe-account">Stripe account</h2>
      {meters.length === 0 ? (
        <p>
          No worker has read the Stripe account's meters yet (is a worker running with STRIPE_SECRET_KEY?).
        </p>
      ) : (
        <table>
          <thead>
            <tr>
              <th>Meter event</th>
              <th>Meter</th>
              <th>State</th>
              <th>Pending rows</th>
              <th>Checked</th>
            </tr>
          </thead>
          <tbody>
            {meters.map((m) => (
              <tr data-testid={`meter-${m.event_name}`} class={m.state === 'active' ? '' : 'drift'}>
                <td>{m.event_name}</td>
                <td>{m.meter_id ?? '—'}</td>
                <td>
                  {STATE_TEXT[m.state]}
                  {m.detail ? ` (${m.detail})` : ''}
                </td>
                <td>{String(pending.get(m.event_name) ?? 0)}</td>
                <td>{m.checked_at.toISOString()}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {held.length > 0 ? (
        <p class="flash error" role="alert">
          Usage of {held.map((m) => m.event_name).join(', ')} is held pending until its meter exists: run{' '}
          <code>meterbox stripe setup</code>, then <code>meterbox stripe check</code>.
        </p>
      ) : null}
      <h3>Reconciliation drift</h3>
      {drift.length === 0 ? (
        <p data-testid="drift-none">
          No open drift between delivered usage and Stripe's meter event summaries.
        </p>
      ) : (
        <table data-testid="drift">
          <thead>
            <tr>
              <th>Customer</th>
              <th>Meter event</th>
              <th>Hour (UTC)</th>
              <th>Delivered</th>
              <th>Stripe counted</th>
              <th>Rows failed for redrive</th>
              <th>Detected</th>
            </tr>
          </thead>
          <tbody>
            {drift.map((d) => (
              <tr class="drift">
                <td>{d.stripe_customer_id}</td>
                <td>{d.event_name}</td>
                <td>{d.hour.toISOString()}</td>
                <td>{d.sent}</td>
                <td>{d.counted}</td>
                <td>{String(d.rows_failed)}</td>
                <td>{d.detected_at.toISOString()}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}
