// The dashboard's "Alert webhooks" panel: the endpoints with their pending and dead deliveries, and
// the latest deliveries with their attempts (each attempt's answer or error), read from the outbox.
import { type Kysely, sql } from 'kysely';
import { listDeliveries } from '../alerts/delivery.js';
import { listEndpoints } from '../alerts/endpoints.js';
import type { DB } from '../db/schema.js';

export async function AlertsPanel(props: { db: Kysely<DB> }) {
  const [endpoints, deliveries] = await Promise.all([
    listEndpoints(props.db),
    listDeliveries(props.db, { limit: 30 }),
  ]);
  const attempts =
    deliveries.length === 0
      ? []
      : (
          await sql<{
            delivery_id: string;
            attempt: number;
            at: Date;
            http_status: number | null;
            error: string | null;
          }>`
            SELECT delivery_id::text, attempt, at, http_status, error FROM webhook_attempts
             WHERE delivery_id = ANY(${deliveries.map((d) => d.id)}::bigint[])
             ORDER BY delivery_id, attempt`.execute(props.db)
        ).rows;
  const attemptsOf = (id: string) =>
    attempts
      .filter((a) => a.delivery_id === id)
      .map(
        (a) =>
          `#${a.attempt} ${new Date(a.at).toISOString().slice(11, 19)} ${a.http_status ?? a.error ?? ''}`,
      )
      .join(', ');
  return (
    <section aria-labelledby="alert-webhooks" data-testid="alert-webhooks">
      <h2 id="alert-webhooks">Alert webhooks</h2>
      {endpoints.length === 0 ? (
        <p>No webhook endpoint: add one with meterbox webhooks add --url https://…</p>
      ) : (
        <table data-testid="webhook-endpoints">
          <thead>
            <tr>
              <th>Endpoint</th>
              <th>URL</th>
              <th>Events</th>
              <th class="num">Pending</th>
              <th class="num">Dead</th>
            </tr>
          </thead>
          <tbody>
            {endpoints.map((e) => (
              <tr data-endpoint={e.id}>
                <td>{e.id}</td>
                <td>{e.url}</td>
                <td>{e.eventTypes.join(', ')}</td>
                <td class="num">{e.pending}</td>
                <td class="num">{e.dead}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {deliveries.length > 0 ? (
        <table data-testid="webhook-deliveries">
          <thead>
            <tr>
              <th>Event</th>
              <th>Type</th>
              <th>Organization</th>
              <th>Endpoint</th>
              <th>Status</th>
              <th class="num">Attempts</th>
              <th>Each attempt (UTC time, answer)</th>
            </tr>
          </thead>
          <tbody>
            {deliveries.map((d) => (
              <tr data-delivery={d.id} data-status={d.status}>
                <td>{d.eventId}</td>
                <td>{d.type}</td>
                <td>{d.organizationId ?? '—'}</td>
                <td>{d.endpointId}</td>
                <td>{d.status}</td>
                <td class="num">{d.attempts}</td>
                <td>{attemptsOf(d.id)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : null}
    </section>
  );
}
