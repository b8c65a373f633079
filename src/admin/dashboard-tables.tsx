// The admin dashboard's tables: failed outbox rows (with Retry), Stripe meter error reports,
// refused (poison) webhook events and the reconciliation by organization.
import type { MeterErrorReport } from '../billing/meter-error-reports.js';
import type { PoisonEvent } from '../billing/poison.js';
import { fmtNum, fmtTime } from './dashboard-format.js';
import type { OutboxRowView } from './outbox.js';
import type { ReconciliationReport } from './reconcile.js';

export function FailedTable(props: { rows: OutboxRowView[]; names: ReadonlyMap<string, string> }) {
  if (props.rows.length === 0) {
    return (
      <p class="muted" data-testid="no-failed">
        No failed rows.
      </p>
    );
  }
  return (
    <>
      <form method="post" action="/admin/ui/retry" class="row">
        <input type="hidden" name="all" value="1" />
        <button type="submit" class="secondary">
          Retry all failed
        </button>
      </form>
      {/* Groups past their destination's identifier window are refused by a plain retry: this one
          compares them with the destination's own totals first (a few calls through its budget). */}
      <form method="post" action="/admin/ui/retry" class="row">
        <input type="hidden" name="all" value="1" />
        <input type="hidden" name="reconcile" value="1" />
        <button type="submit" class="secondary" data-testid="reconcile-retry">
          Reconcile old groups, then retry all failed
        </button>
      </form>
      <div class="scroll">
        <table class="stack" data-testid="failed-table">
          <thead>
            <tr>
              <th>Row</th>
              <th>Organization</th>
              <th>Meter</th>
              <th class="num">Value</th>
              <th class="num">Attempts</th>
              <th>Last error</th>
              <th>Updated</th>
              <th></th>
            </tr>
          </thead>
          <tbody>
            {props.rows.map((r) => (
              <tr data-row-id={r.id}>
                <td data-label="Row">{r.id}</td>
                <td data-label="Organization" title={r.organizationId}>
                  {props.names.get(r.organizationId) ?? `${r.organizationId.slice(0, 8)}…`}
                </td>
                <td data-label="Meter">{r.meter}</td>
                <td class="num" data-label="Value">
                  {r.value}
                </td>
                <td class="num" data-label="Attempts">
                  {r.attempts}
                </td>
                <td class="wrap" data-label="Last error">
                  {r.lastError ?? ''}
                </td>
                <td data-label="Updated">{fmtTime(r.updatedAt)}</td>
                <td class="action">
                  <form method="post" action="/admin/ui/retry" class="inline">
                    <input type="hidden" name="id" value={r.id} />
                    <button type="submit" aria-label={`Retry row ${r.id}`}>
                      Retry
                    </button>
                  </form>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
    </>
  );
}

export function MeterErrorsTable(props: { reports: MeterErrorReport[] }) {
  if (props.reports.length === 0) {
    return (
      <p class="muted" data-testid="no-meter-errors">
        No meter error reports.
      </p>
    );
  }
  return (
    <div class="scroll">
      <table class="stack" data-testid="meter-errors-table">
        <thead>
          <tr>
            <th>Received</th>
            <th>Meter</th>
            <th class="num">Errors</th>
            <th>Summary</th>
            <th>Window</th>
          </tr>
        </thead>
        <tbody>
          {props.reports.map((r) => (
            <tr>
              <td data-label="Received">{fmtTime(r.receivedAt)}</td>
              <td data-label="Meter">{r.meterId ?? '—'}</td>
              <td class="num" data-label="Errors">
                {fmtNum(r.errorCount)}
              </td>
              <td class="wrap" data-label="Summary">
                {r.summary ?? 'details not included in the event'}
              </td>
              <td data-label="Window">
                {r.validationStart ? `${fmtTime(r.validationStart)} – ${fmtTime(r.validationEnd)}` : '—'}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

export function PoisonTable(props: { events: PoisonEvent[] }) {
  if (props.events.length === 0) {
    return (
      <p class="muted" data-testid="no-poison">
        No webhook events refused.
      </p>
    );
  }
  return (
    <div class="scroll">
      <table class="stack" data-testid="poison-table">
        <thead>
          <tr>
            <th>Received</th>
            <th>Event</th>
            <th>Type</th>
            <th>Why</th>
            <th class="num">Deliveries</th>
          </tr>
        </thead>
        <tbody>
          {props.events.map((e) => (
            <tr>
              <td data-label="Received">{fmtTime(e.receivedAt)}</td>
              <td data-label="Event">{e.eventId}</td>
              <td data-label="Type">{e.eventType}</td>
              <td class="wrap" data-label="Why">
                {e.errorCode ? `${e.errorCode}: ` : ''}
                {e.error}
              </td>
              <td class="num" data-label="Deliveries">
                {fmtNum(e.deliveries)}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

function Num(props: { label: string; col: string; value: string; bad?: boolean }) {
  return (
    <td class={props.bad ? 'num drift-cell' : 'num'} data-label={props.label} data-col={props.col}>
      {props.value}
    </td>
  );
}

export function ReconciliationTable(props: { report: ReconciliationReport }) {
  const report = props.report;
  const withStripe = report.stripe === 'compared';
  if (report.organizations.length === 0) {
    return (
      <p class="muted" data-testid="no-reconciliation">
        No readings or usage in this period.
      </p>
    );
  }
  return (
    <div class="scroll">
      <table class="stack" data-testid="reconciliation-table">
        <thead>
          <tr>
            <th>Organization</th>
            <th class="num">Stored</th>
            <th class="num">Delivered</th>
            <th class="num">Pending</th>
            <th class="num">Failed</th>
            <th class="num">Expired</th>
            <th class="num">Voided</th>
            <th class="num">Corrected</th>
            <th class="num">Drift</th>
            {withStripe ? (
              <>
                <th class="num">Stripe</th>
                <th class="num">Stripe drift</th>
              </>
            ) : null}
          </tr>
        </thead>
        <tbody>
          {report.organizations.map((o) => (
            <tr class={o.hasDrift ? 'drift' : ''} data-organization-id={o.organizationId}>
              <td class="title">
                {o.organizationName}
                {o.billable ? '' : <span class="muted"> (not billable)</span>}
              </td>
              <Num label="Stored" col="stored" value={fmtNum(o.readingsStored)} />
              <Num label="Delivered" col="delivered" value={fmtNum(o.usage.delivered)} />
              <Num label="Pending" col="pending" value={fmtNum(o.usage.pending)} />
              <Num label="Failed" col="failed" value={fmtNum(o.usage.failed)} />
              <Num label="Expired" col="expired" value={fmtNum(o.usage.expired)} />
              <Num label="Voided" col="voided" value={fmtNum(o.readingsVoided)} />
              <Num
                label="Corrected"
                col="corrected"
                value={fmtNum(
                  o.corrections.delivered +
                    o.corrections.pending +
                    o.corrections.failed +
                    o.corrections.expired,
                )}
              />
              <Num
                label="Drift"
                col="drift"
                value={o.drift === null ? 'not metered' : fmtNum(o.drift)}
                bad={Boolean(o.drift)}
              />
              {withStripe ? (
                <>
                  <td class="num" data-label="Stripe" data-col="stripe">
                    {o.stripe?.error ? <span title={o.stripe.error}>error</span> : fmtNum(o.stripe?.readings)}
                  </td>
                  <Num
                    label="Stripe drift"
                    col="stripe-drift"
                    value={fmtNum(o.stripe?.drift)}
                    bad={Boolean(o.stripe?.drift)}
                  />
                </>
              ) : null}
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}
