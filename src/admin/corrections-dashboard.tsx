// The dashboard's usage-correction action: a form, then a confirmation page showing the dry run
// (what would be voided, how much of it was billed), then the correction itself. Plain HTML forms
// under the dashboard's session, like retry and redrive.
import type { Context as HonoContext } from 'hono';
import type { Child } from 'hono/jsx';
import type { Context } from '../context-type.js';
import { AppError } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import type { AppEnv, HttpModule } from '../http/types.js';
import {
  type CorrectionInput,
  type CorrectionPreview,
  correctionBody,
  createCorrection,
  previewCorrection,
} from './corrections.js';
import { Page } from './dashboard-page.js';

type Deps = Pick<Context, 'db' | 'boss' | 'config' | 'clock' | 'log'>;

interface FormValues {
  organizationId: string;
  sensorId: string;
  from: string;
  to: string;
  reason: string;
}

const field = (form: Record<string, unknown>, name: string): string =>
  typeof form[name] === 'string' ? (form[name] as string).trim() : '';

/** datetime-local inputs carry no zone: the dashboard reads UTC throughout. */
const toIso = (v: string): string => {
  if (!v) return v;
  const d = new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(v) ? v : `${v}Z`);
  return Number.isNaN(d.getTime()) ? v : d.toISOString();
};

function readForm(form: Record<string, unknown>): FormValues {
  return {
    organizationId: field(form, 'organizationId'),
    sensorId: field(form, 'sensorId'),
    from: toIso(field(form, 'from')),
    to: toIso(field(form, 'to')),
    reason: field(form, 'reason'),
  };
}

function Shell(props: { children: Child }) {
  return (
    <Page title="meterbox · usage corrections">
      <header>
        <h1>meterbox · usage corrections</h1>
        <nav>
          <a href="/admin">Back to the dashboard</a>
        </nav>
      </header>
      <main>{props.children}</main>
    </Page>
  );
}

function Field(props: {
  label: string;
  name: keyof FormValues;
  value?: string;
  required?: boolean;
  placeholder?: string;
  maxlength?: number;
}) {
  return (
    <label>
      {props.label}
      <input
        name={props.name}
        required={props.required}
        maxlength={props.maxlength}
        value={props.value ?? ''}
        placeholder={props.placeholder}
      />
    </label>
  );
}

function FormSection(props: { values: Partial<FormValues>; error?: AppError | string }) {
  const { values, error } = props;
  const message = typeof error === 'string' ? error : error?.message;
  const details = typeof error === 'object' ? error.details : [];
  return (
    <section aria-labelledby="correct">
      <h2 id="correct">Void readings and credit what was billed</h2>
      {message ? (
        <div class="flash error" role="alert" data-testid="correction-error">
          {message}
          {details.map((d) => (
            <>
              <br />
              {d.field ? `${d.field}: ` : ''}
              {d.message}
            </>
          ))}
        </div>
      ) : null}
      <form method="post" action="/admin/ui/corrections/preview" class="row">
        <Field label="Organization id" name="organizationId" required value={values.organizationId} />
        <Field label="Sensor id (empty: all sensors)" name="sensorId" value={values.sensorId} />
        <Field
          label="From (UTC, recorded_at)"
          name="from"
          required
          value={values.from}
          placeholder="2026-11-21T14:00:00Z"
        />
        <Field
          label="To (UTC, exclusive)"
          name="to"
          required
          value={values.to}
          placeholder="2026-11-21T18:00:00Z"
        />
        <Field label="Reason" name="reason" required maxlength={500} value={values.reason} />
        <button type="submit">Preview (dry run)</button>
      </form>
      <p class="muted">Nothing changes until you confirm on the next page.</p>
    </section>
  );
}

function ConfirmSection(props: { values: FormValues; preview: CorrectionPreview }) {
  const { values, preview } = props;
  const fields: (keyof FormValues)[] = ['organizationId', 'sensorId', 'from', 'to', 'reason'];
  return (
    <section aria-labelledby="confirm">
      <h2 id="confirm">Confirm the correction</h2>
      <p data-testid="correction-preview">
        This will void <strong>{preview.readingsToVoid}</strong> reading(s) recorded in [{preview.from},{' '}
        {preview.to})
        {values.sensorId ? (
          <>
            {' '}
            of sensor <code>{values.sensorId}</code>
          </>
        ) : (
          ' of all sensors'
        )}
        ; <strong>{preview.billedReadingsToVoid}</strong> of them were billed and will be credited in Stripe
        (cancelled or compensated in their original hour; a finalized period is flagged for a credit note).
      </p>
      <div class="scroll">
        <table>
          <thead>
            <tr>
              <th>Sensor</th>
              <th class="num">Readings</th>
              <th class="num">Billed</th>
            </tr>
          </thead>
          <tbody>
            {preview.bySensor.map((s) => (
              <tr>
                <td>{s.sensorId}</td>
                <td class="num">{s.readings}</td>
                <td class="num">{s.billed}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      <form method="post" action="/admin/ui/corrections" class="row spaced">
        {fields.map((name) => (
          <input type="hidden" name={name} value={values[name]} />
        ))}
        <button type="submit" disabled={preview.readingsToVoid === 0}>
          Void {preview.readingsToVoid} reading(s)
        </button>
        <a href="/admin/ui/corrections">Cancel</a>
      </form>
    </section>
  );
}

function parse(values: FormValues): { ok: true; input: CorrectionInput } | { ok: false; error: string } {
  if (!values.organizationId) return { ok: false, error: 'Organization id is required.' };
  const parsed = correctionBody.safeParse({
    sensorId: values.sensorId || undefined,
    from: values.from,
    to: values.to,
    reason: values.reason,
  });
  if (!parsed.success) {
    return {
      ok: false,
      error: parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; '),
    };
  }
  return { ok: true, input: parsed.data };
}

export function correctionDashboardRoutes(ctx: Deps): HttpModule {
  const routes = documentedRoutes('/admin');
  const options = () => ({ now: ctx.clock.now(), retentionDays: ctx.config.READINGS_RETENTION_DAYS });
  const render = (c: HonoContext<AppEnv>, body: Child, status: 200 | 404 | 422 = 200) =>
    c.html(<Shell>{body}</Shell>, status);

  routes.route(
    {
      method: 'get',
      path: '/admin/ui/corrections',
      summary: 'Dashboard (HTML): the usage-correction form',
      tag: 'admin dashboard',
      security: 'admin',
      responses: { 200: { description: 'HTML page', contentType: 'text/html' } },
    },
    (c) => render(c, <FormSection values={{}} />),
  );

  routes.route(
    {
      method: 'post',
      path: '/admin/ui/corrections/preview',
      summary:
        'Dashboard (HTML form: organizationId, sensorId, from, to, reason): the dry run and a confirmation form; changes nothing',
      tag: 'admin dashboard',
      security: 'admin',
      responses: { 200: { description: 'HTML page', contentType: 'text/html' } },
    },
    async (c) => {
      const values = readForm(await c.req.parseBody());
      const parsed = parse(values);
      if (!parsed.ok) return render(c, <FormSection values={values} error={parsed.error} />, 422);
      try {
        const preview = await previewCorrection(ctx.db, values.organizationId, parsed.input, options());
        return render(
          c,
          <>
            <ConfirmSection values={values} preview={preview} />
            <FormSection values={values} />
          </>,
        );
      } catch (err) {
        if (err instanceof AppError && (err.status === 404 || err.status === 422)) {
          return render(c, <FormSection values={values} error={err} />, err.status);
        }
        throw err;
      }
    },
  );

  routes.route(
    {
      method: 'post',
      path: '/admin/ui/corrections',
      summary:
        'Dashboard (HTML form: organizationId, sensorId, from, to, reason): record the confirmed correction; answers 303 to /admin',
      tag: 'admin dashboard',
      security: 'admin',
      responses: { 303: { description: 'redirect to the dashboard' } },
    },
    async (c) => {
      const values = readForm(await c.req.parseBody());
      const parsed = parse(values);
      if (!parsed.ok) return render(c, <FormSection values={values} error={parsed.error} />, 422);
      try {
        const correction = await ctx.db
          .transaction()
          .execute((trx) => createCorrection(trx, ctx.boss, values.organizationId, parsed.input, options()));
        ctx.log.info(
          {
            organizationId: values.organizationId,
            correctionId: correction.id,
            readingsVoided: correction.readingsVoided,
          },
          'admin: usage correction recorded from the dashboard',
        );
        const message = `Correction ${correction.id}: voided ${correction.readingsVoided} reading(s), ${correction.billedReadingsVoided} billed; the credit is queued.`;
        return c.redirect(`/admin?flash=${encodeURIComponent(message)}`, 303);
      } catch (err) {
        if (err instanceof AppError && (err.status === 404 || err.status === 422)) {
          return render(c, <FormSection values={values} error={err} />, err.status);
        }
        throw err;
      }
    },
  );

  return routes;
}
