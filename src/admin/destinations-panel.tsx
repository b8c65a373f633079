// The dashboard's "Destinations" panel (issue 34): each destination's pipeline (pending, failed,
// held keys, delivered in the last hour), and every organization not on the default Stripe-only
// setting with its intervals, the switch buttons (set / start-parallel / cut-over, at the next hour
// boundary), and its parity over the last hours: stored − voided against each destination's own
// usage query, so drift shows as soon as it appears.
import { sql } from 'kysely';
import type { Context } from '../context-type.js';
import type { Destination } from '../db/schema.js';
import { fmtNum } from './dashboard-format.js';
import { type IntervalView, listIntervals } from './destinations.js';
import { parityPeriod } from './destinations-routes.js';
import { type ParityReport, parityOf } from './parity.js';

type Deps = Pick<Context, 'db' | 'stripe' | 'metronome' | 'config' | 'clock'>;

/** Organizations shown with their parity (each costs a usage query per destination). */
const MAX_ORGANIZATIONS = 20;
const PARITY_HOURS = 3;

async function readPanel(ctx: Deps) {
  const [pipeline, orgs] = await Promise.all([
    sql<{ destination: Destination; pending: string; failed: string; delivered: string; held: string }>`
      -- Aggregates joined by destination rather than correlated subqueries, which Citus plans over no
      -- distributed table (the outbox and the delivery keys are distributed there).
      SELECT d.destination, coalesce(o.pending, 0)::text AS pending, coalesce(o.failed, 0)::text AS failed,
             coalesce(o.delivered, 0)::text AS delivered, coalesce(k.held, 0)::text AS held
        FROM (VALUES ('stripe'), ('metronome')) AS d(destination)
        LEFT JOIN (SELECT destination, count(*) FILTER (WHERE status = 'pending') AS pending,
                          count(*) FILTER (WHERE status = 'failed') AS failed,
                          count(*) FILTER (WHERE status = 'delivered' AND delivered_at > now() - interval '1 hour')
                            AS delivered
                     FROM meter_outbox
                    WHERE status IN ('pending', 'failed')
                       OR (status = 'delivered' AND delivered_at > now() - interval '1 hour')
                    GROUP BY destination) o ON o.destination = d.destination
        LEFT JOIN (SELECT destination, count(*) AS held FROM meter_delivery_keys WHERE hold IS NOT NULL
                    GROUP BY destination) k ON k.destination = d.destination`.execute(ctx.db),
    sql<{ id: string; name: string }>`
      SELECT o.id, o.name FROM organizations o
       WHERE EXISTS (SELECT 1 FROM organization_destinations d WHERE d.organization_id = o.id)
       ORDER BY o.name, o.id LIMIT ${MAX_ORGANIZATIONS}`.execute(ctx.db),
  ]);
  const period = parityPeriod(ctx.clock.now(), PARITY_HOURS);
  const organizations = await Promise.all(
    orgs.rows.map(async (o) => {
      const intervals = await listIntervals(ctx.db, o.id);
      const parity: ParityReport | string = await parityOf(ctx, o.id, period).catch(
        (err: unknown) => `parity unavailable: ${err instanceof Error ? err.message : String(err)}`,
      );
      return { ...o, intervals, parity };
    }),
  );
  return { pipeline: pipeline.rows, organizations };
}

const when = (d: Date | null) => (d ? d.toISOString().slice(0, 16).replace('T', ' ') : 'always');

function Intervals(props: { intervals: readonly IntervalView[] }) {
  return (
    <ul class="plain">
      {props.intervals.map((i) => (
        <li>
          {i.destination} ({i.role}) {when(i.from)} → {i.until ? when(i.until) : 'open'}
        </li>
      ))}
    </ul>
  );
}

function Switch(props: { organizationId: string; intervals: readonly IntervalView[] }) {
  const open = props.intervals.filter((i) => i.until === null);
  const shadow = open.find((i) => i.role === 'shadow');
  const billing = open.find((i) => i.role === 'billing');
  const other: Destination = billing?.destination === 'metronome' ? 'stripe' : 'metronome';
  const button = (action: string, label: string, destination?: Destination) => (
    <form method="post" action="/admin/ui/destinations" class="inline">
      <input type="hidden" name="organization" value={props.organizationId} />
      <input type="hidden" name="action" value={action} />
      {destination ? <input type="hidden" name="destination" value={destination} /> : null}
      <button type="submit" class="secondary">
        {label}
      </button>
    </form>
  );
  return (
    <div class="row">
      {shadow
        ? button('cut-over', `Cut over to ${shadow.destination}`)
        : button('start-parallel', `Parallel run to ${other}`, other)}
      {button('set', `Move to ${other} outright`, other)}
    </div>
  );
}

function Parity(props: { parity: ParityReport | string }) {
  if (typeof props.parity === 'string') return <p class="muted">{props.parity}</p>;
  const rows = props.parity.rows.filter((r) => r.expected !== 0 || (r.reported ?? 0) !== 0);
  if (rows.length === 0) return <p class="muted">No usage in the last {PARITY_HOURS} hours.</p>;
  return (
    <table>
      <thead>
        <tr>
          <th>hour (UTC)</th>
          <th>destination</th>
          <th class="num">stored − voided</th>
          <th class="num">delivered</th>
          <th class="num">destination says</th>
          <th class="num">drift</th>
        </tr>
      </thead>
      <tbody>
        {rows.map((r) => (
          <tr>
            <td>{r.hour.toISOString().slice(0, 13)}</td>
            <td>
              {r.destination} ({r.role})
            </td>
            <td class="num">{fmtNum(r.expected)}</td>
            <td class="num">{fmtNum(r.delivered)}</td>
            <td class="num">{r.reported === null ? '?' : fmtNum(r.reported)}</td>
            <td class={r.drift ? 'num drift-cell' : 'num'} data-testid="parity-drift">
              {r.drift === null ? '?' : r.drift === 0 ? 'exact' : fmtNum(r.drift)}
            </td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

export async function DestinationsPanel(props: { ctx: Deps }) {
  const { pipeline, organizations } = await readPanel(props.ctx);
  const configured = { stripe: props.ctx.stripe !== undefined, metronome: props.ctx.metronome !== undefined };
  return (
    <section aria-labelledby="destinations" data-testid="destinations">
      <h2 id="destinations">Destinations</h2>
      <table>
        <thead>
          <tr>
            <th>destination</th>
            <th>configured</th>
            <th class="num">pending</th>
            <th class="num">failed</th>
            <th class="num">held keys</th>
            <th class="num">delivered (1 h)</th>
          </tr>
        </thead>
        <tbody>
          {pipeline.map((p) => (
            <tr data-testid={`destination-${p.destination}`}>
              <td>{p.destination}</td>
              <td>{configured[p.destination] ? 'yes' : 'no — its rows are held'}</td>
              <td class="num">{fmtNum(Number(p.pending))}</td>
              <td class={Number(p.failed) > 0 ? 'num drift-cell' : 'num'}>{fmtNum(Number(p.failed))}</td>
              <td class={Number(p.held) > 0 ? 'num drift-cell' : 'num'}>{fmtNum(Number(p.held))}</td>
              <td class="num">{fmtNum(Number(p.delivered))}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <p class="muted">
        Organizations without a row below bill to Stripe alone. A change takes effect at the next UTC hour
        boundary at least five minutes ahead; parity compares the last {PARITY_HOURS} hours.
      </p>
      <form method="post" action="/admin/ui/destinations" class="row" data-testid="destinations-form">
        <label>
          Organization id
          <input type="text" name="organization" required pattern="[0-9a-fA-F-]{36}" />
        </label>
        <label>
          Change
          <select name="action">
            <option value="start-parallel">parallel run to</option>
            <option value="set">move outright to</option>
          </select>
        </label>
        <label>
          Destination
          <select name="destination">
            <option value="metronome">metronome</option>
            <option value="stripe">stripe</option>
          </select>
        </label>
        <button type="submit" class="secondary">
          Apply at the next hour boundary
        </button>
      </form>
      {organizations.map((o) => (
        <article data-testid={`destinations-${o.id}`}>
          <h3>
            {o.name} <span class="muted">{o.id}</span>
          </h3>
          <Intervals intervals={o.intervals} />
          <Switch organizationId={o.id} intervals={o.intervals} />
          <Parity parity={o.parity} />
        </article>
      ))}
    </section>
  );
}
