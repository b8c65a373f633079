// The dashboard's "Scheduled reconciliation" panel: where each destination's pass stands (customers
// compared, the last pass's end and length) and the open drift at Metronome (Stripe's is in the
// Stripe account panel), read from what the worker's runs wrote.
import type { Kysely } from 'kysely';
import type { DB } from '../db/schema.js';
import { readPasses } from './scheduled-reconciliation.js';

const fmtSeconds = (s: number | null) =>
  s === null ? '—' : s < 120 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`;

export async function ReconciliationPanel(props: { db: Kysely<DB> }) {
  const [passes, drift] = await Promise.all([
    readPasses(props.db),
    props.db
      .selectFrom('reconciliation_drift')
      .selectAll()
      .where('destination', '=', 'metronome')
      .where('resolved_at', 'is', null)
      .orderBy('hour', 'desc')
      .limit(50)
      .execute(),
  ]);
  return (
    <section aria-labelledby="scheduled-reconciliation" data-testid="scheduled-reconciliation">
      <h2 id="scheduled-reconciliation">Scheduled reconciliation</h2>
      <table data-testid="reconciliation-passes">
        <thead>
          <tr>
            <th>Destination</th>
            <th>Now</th>
            <th class="num">Customers this pass</th>
            <th class="num">Calls this pass</th>
            <th>Last pass ended</th>
            <th class="num">Last pass took</th>
            <th class="num">Passes</th>
          </tr>
        </thead>
        <tbody>
          {passes.map((p) => (
            <tr data-destination={p.destination}>
              <td>{p.destination}</td>
              <td>{p.running ? 'running' : p.pass_to ? `paused after ${p.cursor ?? '—'}` : 'idle'}</td>
              <td class="num">{String(p.customers_done)}</td>
              <td class="num">{String(p.calls)}</td>
              <td>{p.last_pass_completed_at ? new Date(p.last_pass_completed_at).toISOString() : 'never'}</td>
              <td class="num">{fmtSeconds(p.last_pass_seconds)}</td>
              <td class="num">{String(p.passes_completed)}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <h3>Metronome drift</h3>
      {drift.length === 0 ? (
        <p data-testid="metronome-drift-none">
          No open drift between delivered usage and Metronome's usage query.
        </p>
      ) : (
        <table data-testid="metronome-drift">
          <thead>
            <tr>
              <th>Ingest alias</th>
              <th>Meter event</th>
              <th>Hour (UTC)</th>
              <th>Delivered</th>
              <th>Metronome counted</th>
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
